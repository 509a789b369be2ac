//! One phase call: `req`, `res` and `ctx` as Lua sees them. Each is an empty table, made once
//! per VM (`ctx`: once per use) and kept empty: its protected metatable's `__index` reads what
//! the plugin asks for from the request being served (a thread-local `Current`, set for the
//! call's duration) and its `__newindex` writes there — `req.path`, `req.query`, `res.status`,
//! and the plugin's own `ctx` values (into a table made only when it sets one). The headers are
//! lent to one `Headers` userdata per VM on first read. So a call that sets one header makes
//! no table and no userdata, and after it nothing is read back through the Lua API (each such
//! read is a protected call). `rawset` is not in the sandbox, so the shared tables stay empty.

use std::cell::RefCell;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use mlua::{Lua, Table, Value};

use super::api::Headers;
use super::vm::{self, Vm};
use super::{Step, Use, LOG, REQUEST, RESPONSE};
use crate::backend::RespBody;
use crate::body::ReqBody;
use crate::context::Exchange;

/// The request (or response) a call is about.
#[derive(Default)]
struct Current {
    x: Option<Exchange>,
    client_ip: Option<http::HeaderValue>,
    method: Option<Method>,
    uri: Option<Uri>,
    body: Option<Bytes>,
    status: u16,
    /// The headers, until the plugin reads `req.headers`/`res.headers` (then lent to the VM's
    /// `Headers` userdata, which is `lent`).
    headers: Option<HeaderMap>,
    headers_ud: Option<mlua::AnyUserData>,
    lent: bool,
    /// The plugin's own `ctx` values (made when it sets the first).
    own: Option<Table>,
    /// What the plugin assigned.
    new_path: Option<String>,
    new_query: Option<Option<String>>,
    new_status: Option<i64>,
}

thread_local! {
    static CURRENT: RefCell<Current> = RefCell::new(Current::default());
}

/// The VM's `req` and `res` tables and its `Headers` userdata.
pub(super) struct Metas {
    req: Table,
    res: Table,
    headers: mlua::AnyUserData,
}

/// An empty table with `meta` as its metatable (protected: `getmetatable` sees `false`,
/// `setmetatable` fails).
fn object(lua: &Lua, meta: &Table) -> mlua::Result<Table> {
    meta.raw_set("__metatable", false)?;
    let t = lua.create_table()?;
    t.set_metatable(Some(meta.clone()))?;
    Ok(t)
}

/// Builds the VM's `req` and `res` metatables.
pub(super) fn metas(lua: &Lua) -> mlua::Result<Metas> {
    let req = lua.create_table()?;
    req.raw_set(
        "__index",
        lua.create_function(|lua, (_t, k): (Table, mlua::LuaString)| {
            let key = k.to_str()?;
            CURRENT.with(|c| -> mlua::Result<Value> {
                let mut c = c.borrow_mut();
                Ok(match &*key {
                    "method" => match &c.method {
                        Some(m) => Value::String(lua.create_string(m.as_str())?),
                        None => Value::Nil,
                    },
                    "path" => match (&c.new_path, &c.uri) {
                        (Some(p), _) => Value::String(lua.create_string(p)?),
                        (None, Some(u)) => Value::String(lua.create_string(u.path())?),
                        (None, None) => Value::Nil,
                    },
                    "query" => {
                        let q = match &c.new_query {
                            Some(q) => q.as_deref(),
                            None => c.uri.as_ref().and_then(|u| u.query()),
                        };
                        match q {
                            Some(q) => Value::String(lua.create_string(q)?),
                            None => Value::Nil,
                        }
                    }
                    "body" => match &c.body {
                        Some(b) => Value::String(lua.create_string(b)?),
                        None => Value::Nil,
                    },
                    "headers" => headers(&mut c)?,
                    _ => Value::Nil,
                })
            })
        })?,
    )?;
    req.raw_set(
        "__newindex",
        lua.create_function(|_, (_t, k, v): (Table, mlua::LuaString, Value)| {
            let key = k.to_str()?;
            let text = |v: &Value| -> mlua::Result<Option<String>> {
                match v {
                    Value::Nil => Ok(None),
                    Value::String(s) => Ok(Some(s.to_str()?.to_owned())),
                    other => Err(mlua::Error::runtime(format!(
                        "req.{key} must be a string, not a {}",
                        other.type_name()
                    ))),
                }
            };
            CURRENT.with(|c| -> mlua::Result<()> {
                let mut c = c.borrow_mut();
                match &*key {
                    "path" => {
                        c.new_path = Some(
                            text(&v)?
                                .ok_or_else(|| mlua::Error::runtime("req.path cannot be nil"))?,
                        )
                    }
                    "query" => c.new_query = Some(text(&v)?),
                    _ => {
                        return Err(mlua::Error::runtime(format!(
                        "req.{key} cannot be assigned (req.path, req.query and req.headers[…] can)"
                    )))
                    }
                }
                Ok(())
            })
        })?,
    )?;
    let res = lua.create_table()?;
    res.raw_set(
        "__index",
        lua.create_function(|_, (_t, k): (Table, mlua::LuaString)| {
            let key = k.to_str()?;
            CURRENT.with(|c| -> mlua::Result<Value> {
                let mut c = c.borrow_mut();
                Ok(match &*key {
                    "status" => {
                        Value::Integer(c.new_status.unwrap_or(mlua::Integer::from(c.status)))
                    }
                    "headers" => headers(&mut c)?,
                    _ => Value::Nil,
                })
            })
        })?,
    )?;
    res.raw_set(
        "__newindex",
        lua.create_function(|_, (_t, k, v): (Table, mlua::LuaString, Value)| {
            let key = k.to_str()?;
            if &*key != "status" {
                return Err(mlua::Error::runtime(format!(
                    "res.{key} cannot be assigned (res.status and res.headers[…] can)"
                )));
            }
            let Value::Integer(n) = v else {
                return Err(mlua::Error::runtime("res.status must be an integer"));
            };
            CURRENT.with(|c| c.borrow_mut().new_status = Some(n));
            Ok(())
        })?,
    )?;
    Ok(Metas {
        req: object(lua, &req)?,
        res: object(lua, &res)?,
        headers: lua.create_userdata(Headers(HeaderMap::new()))?,
    })
}

/// The VM's headers userdata, with the call's headers lent to it on first read.
fn headers(c: &mut Current) -> mlua::Result<Value> {
    let Some(ud) = c.headers_ud.clone() else {
        return Ok(Value::Nil);
    };
    if !c.lent {
        // Borrowed first: a failed borrow leaves the headers where they are.
        let mut lent = ud.borrow_mut::<Headers>()?;
        lent.0 = c.headers.take().unwrap_or_default();
        c.lent = true;
    }
    Ok(Value::UserData(ud))
}

/// The `ctx` table of a use: its config and route, the request's values on demand, and the
/// plugin's own values in `Current::own`.
fn ctx_object(vm: &Vm, u: &Use) -> mlua::Result<Table> {
    let key = u.id;
    if let Some(t) = vm.configs.borrow().get(&key) {
        return Ok(t.clone());
    }
    let lua = &vm.lua;
    // Read-only, nested tables too: a plugin cannot leave state in it for the next request.
    let config: Table = match mlua::LuaSerdeExt::to_value(lua, &*u.config)? {
        Value::Table(t) => vm.readonly.call(t)?,
        _ => vm.readonly.call(lua.create_table()?)?,
    };
    let route = lua.create_string(&*u.route)?;
    let meta = lua.create_table()?;
    meta.raw_set(
        "__index",
        lua.create_function(move |lua, (_t, k): (Table, Value)| {
            let own = CURRENT.with(|c| c.borrow().own.clone());
            if let Some(own) = own {
                let v: Value = own.raw_get(&k)?;
                if !v.is_nil() {
                    return Ok(v);
                }
            }
            let Value::String(k) = k else {
                return Ok(Value::Nil);
            };
            let key = k.to_str()?;
            match &*key {
                "config" => return Ok(Value::Table(config.clone())),
                "route" => return Ok(Value::String(route.clone())),
                _ => {}
            }
            CURRENT.with(|c| -> mlua::Result<Value> {
                let c = c.borrow();
                let Some(x) = &c.x else { return Ok(Value::Nil) };
                Ok(match &*key {
                    "client_ip" => match &c.client_ip {
                        Some(ip) => Value::String(lua.create_string(ip.as_bytes())?),
                        None => Value::String(lua.create_string(x.client().peer_ip.as_bytes())?),
                    },
                    "request_id" => Value::String(lua.create_string(x.request_id().as_bytes())?),
                    "params" => {
                        let p = lua.create_table()?;
                        for (k, v) in x.params() {
                            p.raw_set(k, v)?;
                        }
                        Value::Table(p)
                    }
                    "consumer" => match x.identity().and_then(|i| i.consumer.as_deref()) {
                        Some(c) => Value::String(lua.create_string(c)?),
                        None => Value::Nil,
                    },
                    "claims" => match x.identity().and_then(|i| i.claims.as_deref()) {
                        Some(c) => mlua::LuaSerdeExt::to_value(lua, c)?,
                        None => Value::Nil,
                    },
                    _ => Value::Nil,
                })
            })
        })?,
    )?;
    meta.raw_set(
        "__newindex",
        lua.create_function(|lua, (_t, k, v): (Table, Value, Value)| {
            let own = CURRENT.with(|c| c.borrow().own.clone());
            let own = match own {
                Some(o) => o,
                None => {
                    let o = lua.create_table()?;
                    CURRENT.with(|c| c.borrow_mut().own = Some(o.clone()));
                    o
                }
            };
            own.raw_set(k, v)
        })?,
    )?;
    let t = object(lua, &meta)?;
    vm.configs.borrow_mut().insert(key, t.clone());
    Ok(t)
}

/// The plugin's own values of the earlier phases, as a table for `Current::own`.
fn own_table(
    lua: &Lua,
    own: &serde_json::Map<String, serde_json::Value>,
) -> mlua::Result<Option<Table>> {
    if own.is_empty() {
        return Ok(None);
    }
    let t = lua.create_table()?;
    for (k, v) in own {
        t.raw_set(k.as_str(), mlua::LuaSerdeExt::to_value(lua, v)?)?;
    }
    Ok(Some(t))
}

/// The values the plugin set in `ctx`, for its later phases.
fn own(lua: &Lua, t: Option<&Table>) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    let Some(t) = t else { return out };
    for (k, v) in t.pairs::<String, Value>().flatten() {
        if let Ok(j) = mlua::LuaSerdeExt::from_value::<serde_json::Value>(lua, v) {
            out.insert(k, j);
        }
    }
    out
}

/// What a call left: the headers, the assignments and the plugin's own `ctx` values.
struct Left {
    headers: HeaderMap,
    path: Option<String>,
    query: Option<Option<String>>,
    status: Option<i64>,
    own: Option<Table>,
}

/// Sets the call's `Current`, runs `f`, and clears it (taking back what the plugin left).
fn with_current<R>(vm: &Vm, mut cur: Current, f: impl FnOnce() -> R) -> (R, Left) {
    cur.headers_ud = Some(vm.metas.headers.clone());
    CURRENT.with(|c| *c.borrow_mut() = cur);
    let out = f();
    let c = CURRENT.with(|c| std::mem::take(&mut *c.borrow_mut()));
    let lent = c.headers_ud.filter(|_| c.lent).and_then(|ud| {
        ud.borrow_mut::<Headers>()
            .ok()
            .map(|mut h| std::mem::take(&mut h.0))
    });
    let left = Left {
        headers: lent.or(c.headers).unwrap_or_default(),
        path: c.new_path,
        query: c.new_query,
        status: c.new_status,
        own: c.own,
    };
    (out, left)
}

impl Use {
    pub(super) fn on_request(
        &self,
        req: &mut Request<ReqBody>,
        x: Option<&Exchange>,
        body: Option<&Bytes>,
        client_ip: &http::HeaderValue,
    ) -> Result<Step, String> {
        let budget = self.set.time_budget;
        vm::with_vm(&self.set, |vm| -> Result<Step, String> {
            let Some(f) = vm
                .plugins
                .get(&*self.name)
                .and_then(|l| l.on_request.clone())
            else {
                return Ok(Step::Continue(serde_json::Map::new()));
            };
            let lua = &vm.lua;
            let cur = Current {
                x: x.cloned(),
                client_ip: Some(client_ip.clone()),
                method: Some(req.method().clone()),
                uri: Some(req.uri().clone()),
                body: body.cloned(),
                headers: Some(std::mem::take(req.headers_mut())),
                ..Current::default()
            };
            let (called, left) = with_current(vm, cur, || -> mlua::Result<Value> {
                let c = ctx_object(vm, self)?;
                self.timed(REQUEST, || vm::call(&f, budget, (&vm.metas.req, &c)))
            });
            *req.headers_mut() = left.headers;
            let answer = called.map_err(|e| e.to_string())?;
            let step = match answer {
                Value::Table(t) => Step::Respond(
                    Box::new(response_from(&t).map_err(|e| e.to_string())?),
                    if self.phases[LOG] {
                        own(lua, left.own.as_ref())
                    } else {
                        serde_json::Map::new()
                    },
                ),
                Value::Nil => Step::Continue(if self.phases[RESPONSE] || self.phases[LOG] {
                    own(lua, left.own.as_ref())
                } else {
                    serde_json::Map::new()
                }),
                other => {
                    return Err(format!(
                        "on_request returned a {}; return nothing, or a table {{ status, body, headers }}",
                        other.type_name()
                    ))
                }
            };
            // The path and query the plugin set, if it did.
            if left.path.is_some() || left.query.is_some() {
                let path = left.path.unwrap_or_else(|| req.uri().path().to_owned());
                let query = match left.query {
                    Some(q) => q,
                    None => req.uri().query().map(str::to_owned),
                };
                let path_changed = path != req.uri().path();
                if path_changed {
                    self.check_path(&path)?;
                    // Once per request: checked before anything changes.
                    if !x.is_none_or(|x| x.rewrite_path(&path)) {
                        return Err(
                            "req.path was rewritten by another plugin of this request already"
                                .into(),
                        );
                    }
                }
                set_target(req, &path, query.as_deref())?;
            }
            Ok(step)
        })?
    }

    pub(super) fn on_response(
        &self,
        resp: &mut Response<RespBody>,
        x: Option<&Exchange>,
        own_values: &mut serde_json::Map<String, serde_json::Value>,
        client_ip: &http::HeaderValue,
    ) -> Result<(), String> {
        let budget = self.set.time_budget;
        vm::with_vm(&self.set, |vm| -> Result<(), String> {
            let Some(f) = vm
                .plugins
                .get(&*self.name)
                .and_then(|l| l.on_response.clone())
            else {
                return Ok(());
            };
            let lua = &vm.lua;
            let cur = Current {
                x: x.cloned(),
                client_ip: Some(client_ip.clone()),
                status: resp.status().as_u16(),
                headers: Some(std::mem::take(resp.headers_mut())),
                own: own_table(lua, own_values).map_err(|e| e.to_string())?,
                ..Current::default()
            };
            let (called, left) = with_current(vm, cur, || -> mlua::Result<()> {
                let c = ctx_object(vm, self)?;
                self.timed(RESPONSE, || vm::call::<()>(&f, budget, (&vm.metas.res, &c)))
            });
            *resp.headers_mut() = left.headers;
            called.map_err(|e| e.to_string())?;
            if let Some(status) = left.status {
                *resp.status_mut() = u16::try_from(status)
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .filter(|s| (200..=599).contains(&s.as_u16()))
                    .ok_or_else(|| format!("res.status = {status}: a status must be 200 to 599"))?;
            }
            if self.phases[LOG] {
                *own_values = own(lua, left.own.as_ref());
            }
            Ok(())
        })?
    }

    pub(super) fn on_log(
        &self,
        x: Option<&Exchange>,
        client_ip: &http::HeaderValue,
        own_values: &serde_json::Map<String, serde_json::Value>,
    ) {
        if !self.phases[LOG] {
            return;
        }
        let budget = self.set.time_budget;
        let r = vm::with_vm(&self.set, |vm| -> Result<(), String> {
            let Some(f) = vm.plugins.get(&*self.name).and_then(|l| l.on_log.clone()) else {
                return Ok(());
            };
            let cur = Current {
                x: x.cloned(),
                client_ip: Some(client_ip.clone()),
                own: own_table(&vm.lua, own_values).map_err(|e| e.to_string())?,
                ..Current::default()
            };
            let (called, _) = with_current(vm, cur, || -> mlua::Result<()> {
                let c = ctx_object(vm, self)?;
                self.timed(LOG, || vm::call::<()>(&f, budget, &c))
            });
            called.map_err(|e| e.to_string())
        });
        if let Err(e) = r.and_then(|r| r) {
            // The response is on its way: a failing on_log is counted and logged only.
            self.errors.inc();
            tracing::error!(plugin = %self.name, route = %self.route, phase = "on_log", error = ?e, "plugin failed");
        }
    }
}

impl Use {
    /// A path a plugin rewrote to: an absolute path without `?`, `#`, `.`/`..` segments or
    /// empty segments, under the frontend's prefix (the backend strips it).
    fn check_path(&self, path: &str) -> Result<(), String> {
        let bad = !path.starts_with('/')
            || path.contains(['?', '#'])
            || path.contains("//")
            || path.split('/').any(|seg| seg == "." || seg == "..");
        if bad {
            return Err(format!(
                "req.path = {path:?}: a path starts with `/` and has no `?`, `#`, `.`, `..` or empty segments"
            ));
        }
        let p = &*self.prefix;
        if !(p.is_empty() || path == p || path.starts_with(&format!("{p}/"))) {
            return Err(format!(
                "req.path = {path:?} must stay under the frontend's prefix `{p}`"
            ));
        }
        Ok(())
    }
}

/// `{ status, body, headers }` from `on_request`, as a response.
fn response_from(t: &Table) -> mlua::Result<Response<RespBody>> {
    let status: Option<u16> = t.raw_get("status")?;
    let status = StatusCode::from_u16(status.unwrap_or(200))
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| mlua::Error::runtime("status must be 200 to 599"))?;
    let body: Option<mlua::LuaString> = t.raw_get("body")?;
    let mut resp = Response::new(crate::backend::full(
        body.map(|b| Bytes::copy_from_slice(&b.as_bytes()))
            .unwrap_or_default(),
    ));
    *resp.status_mut() = status;
    if let Some(h) = t.raw_get::<Option<Table>>("headers")? {
        let mut map = HeaderMap::new();
        for pair in h.pairs::<mlua::LuaString, mlua::LuaString>() {
            let (k, v) = pair?;
            let name = http::HeaderName::from_bytes(&k.as_bytes())
                .map_err(|_| mlua::Error::runtime("a response header name is not valid"))?;
            let value = http::HeaderValue::from_bytes(&v.as_bytes())
                .map_err(|_| mlua::Error::runtime("a response header value is not valid"))?;
            map.append(name, value);
        }
        *resp.headers_mut() = map;
    }
    Ok(resp)
}

/// Sets a request's path and query from what a plugin left (checked like a client's).
fn set_target(req: &mut Request<ReqBody>, path: &str, query: Option<&str>) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("req.path must start with `/`".into());
    }
    let pq = match query {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_owned(),
    };
    let pq = http::uri::PathAndQuery::try_from(pq)
        .map_err(|_| "req.path or req.query has characters a URI cannot hold".to_owned())?;
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(pq);
    *req.uri_mut() =
        Uri::from_parts(parts).map_err(|_| "the new request target is not valid".to_owned())?;
    Ok(())
}
