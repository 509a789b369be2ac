//! What a Lua plugin can call: `req.headers` / `res.headers` (a `Headers` userdata: read by name
//! case-insensitively, assign a string to set, `nil` to remove; values that are not valid header
//! values are errors) and the `gatehouse` table — `hmac_sha256(key, data)` and `sha256(data)`
//! (lower-case hex), `ip_in(ip, {cidr, …})`, and `log(level, message)`.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use mlua::{Lua, MetaMethod, UserData, UserDataMethods, Value};

/// A request's or response's headers, lent to Lua for one call.
pub(super) struct Headers(pub(super) HeaderMap);

impl UserData for Headers {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_meta_method(MetaMethod::Index, |lua, this, name: mlua::LuaString| {
            let name = name.to_str()?;
            match this.0.get(&*name) {
                Some(v) => Ok(Value::String(lua.create_string(v.as_bytes())?)),
                None => Ok(Value::Nil),
            }
        });
        m.add_meta_method_mut(
            MetaMethod::NewIndex,
            |_, this, (name, value): (mlua::LuaString, Option<mlua::LuaString>)| {
                let name = HeaderName::from_bytes(name.as_bytes().as_ref()).map_err(|_| {
                    mlua::Error::runtime(format!(
                        "`{}` is not a header name",
                        name.to_string_lossy()
                    ))
                })?;
                match value {
                    None => {
                        this.0.remove(&name);
                    }
                    Some(v) => {
                        let v = HeaderValue::from_bytes(v.as_bytes().as_ref()).map_err(|_| {
                            mlua::Error::runtime(format!(
                                "the value for header `{name}` has characters a header cannot hold"
                            ))
                        })?;
                        this.0.insert(name, v);
                    }
                }
                Ok(())
            },
        );
        // `headers:all()`: a table of name → value (the first of each name).
        m.add_method("all", |lua, this, ()| {
            let t = lua.create_table()?;
            for (k, v) in &this.0 {
                if t.raw_get::<Value>(k.as_str())?.is_nil() {
                    t.raw_set(k.as_str(), lua.create_string(v.as_bytes())?)?;
                }
            }
            Ok(t)
        });
    }
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

/// Sets the `gatehouse` global.
pub(super) fn install(lua: &Lua) -> mlua::Result<()> {
    let gh = lua.create_table()?;
    gh.set(
        "hmac_sha256",
        lua.create_function(|_, (key, data): (mlua::LuaString, mlua::LuaString)| {
            let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.as_bytes());
            Ok(hex(ring::hmac::sign(&k, &data.as_bytes()).as_ref()))
        })?,
    )?;
    gh.set(
        "sha256",
        lua.create_function(|_, data: mlua::LuaString| {
            Ok(hex(ring::digest::digest(
                &ring::digest::SHA256,
                &data.as_bytes(),
            )
            .as_ref()))
        })?,
    )?;
    gh.set(
        "ip_in",
        lua.create_function(|_, (ip, list): (String, mlua::Table)| {
            let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
                return Ok(false);
            };
            let mut found = false;
            // Through the metamethods: `ctx.config` lists are read-only views.
            for i in 1..=list.len()? {
                let c: String = list.get(i)?;
                let net = match c.parse::<ipnet::IpNet>() {
                    Ok(n) => n,
                    Err(_) => match c.parse::<std::net::IpAddr>() {
                        Ok(a) => ipnet::IpNet::from(a),
                        Err(_) => {
                            return Err(mlua::Error::runtime(format!(
                                "`{c}` is not an address or a CIDR block"
                            )))
                        }
                    },
                };
                found |= net.contains(&ip);
            }
            Ok(found)
        })?,
    )?;
    gh.set(
        "log",
        lua.create_function(|_, (level, msg): (String, String)| {
            match level.as_str() {
                "error" => tracing::error!(target: "gatehouse::plugin", "{msg}"),
                "warn" => tracing::warn!(target: "gatehouse::plugin", "{msg}"),
                "debug" => tracing::debug!(target: "gatehouse::plugin", "{msg}"),
                _ => tracing::info!(target: "gatehouse::plugin", "{msg}"),
            }
            Ok(())
        })?,
    )?;
    lua.globals().set("gatehouse", gh)?;
    // `print` goes to the log, not to stdout.
    lua.globals().set(
        "print",
        lua.create_function(|_, args: mlua::Variadic<Value>| {
            let line: Vec<String> = args
                .iter()
                .map(|v| v.to_string().unwrap_or_else(|_| v.type_name().to_owned()))
                .collect();
            tracing::info!(target: "gatehouse::plugin", "{}", line.join("\t"));
            Ok(())
        })?,
    )?;
    Ok(())
}
