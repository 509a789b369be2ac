//! The Lua side: a sandboxed Lua 5.4 VM per worker thread (a `thread_local`, the per-worker
//! way for state that is not `Send`), built from a `PluginSet` and rebuilt when a reload brings
//! another set. Only `string`, `table`, `math` and `utf8` are opened; `load`, `loadfile`,
//! `dofile`, `require`, `collectgarbage` and `string.dump` are removed, and assigning a global
//! is an error, so a plugin keeps no state in `_G` from one request to the next. Every call
//! runs under the set's memory limit (per VM) and time budget (per call: an instruction-count
//! hook checks the clock every 1 000 instructions).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Table, Value, VmState};

use super::{PluginSet, Script};

/// One loaded plugin: its phase functions.
pub(super) struct Loaded {
    pub(super) on_request: Option<Function>,
    pub(super) on_response: Option<Function>,
    pub(super) on_log: Option<Function>,
}

/// A worker's VM for one plugin set.
pub(super) struct Vm {
    pub(super) lua: Lua,
    pub(super) plugins: HashMap<Arc<str>, Loaded>,
    /// The `ctx` metatables, built once per (route, plugin) use: keyed by the address of the
    /// use's config, which the use holds (an `Arc`) for as long as it lives.
    pub(super) configs: RefCell<HashMap<usize, Table>>,
    /// The `req` and `res` metatables.
    pub(super) metas: super::call::Metas,
}

thread_local! {
    /// This thread's VMs: the newest sets' (a reload briefly has two in use).
    static VMS: RefCell<Vec<(u64, Rc<Vm>)>> = const { RefCell::new(Vec::new()) };
    /// When the call running now must end.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` with this thread's VM for `set` (built on first use).
pub(super) fn with_vm<R>(set: &PluginSet, f: impl FnOnce(&Vm) -> R) -> Result<R, String> {
    let vm = VMS.with(|vms| -> Result<Rc<Vm>, String> {
        let mut vms = vms.borrow_mut();
        if let Some((_, vm)) = vms.iter().find(|(g, _)| *g == set.id) {
            return Ok(vm.clone());
        }
        let vm = Rc::new(build(set)?);
        vms.push((set.id, vm.clone()));
        // Two sets at most: the one a reload replaced goes once the next one comes.
        if vms.len() > 2 {
            vms.remove(0);
        }
        Ok(vm)
    })?;
    Ok(f(&vm))
}

/// Runs one phase function within the time budget.
pub(super) fn call<R: mlua::FromLuaMulti>(
    f: &Function,
    budget: Duration,
    args: impl mlua::IntoLuaMulti,
) -> mlua::Result<R> {
    DEADLINE.with(|d| d.set(Some(Instant::now() + budget)));
    let out = f.call(args);
    DEADLINE.with(|d| d.set(None));
    out
}

/// A new sandboxed VM with the set's limits.
pub(super) fn sandbox(memory_limit: usize) -> mlua::Result<Lua> {
    let lua = Lua::new_with(
        StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8,
        LuaOptions::default(),
    )?;
    lua.set_memory_limit(memory_limit)?;
    let g = lua.globals();
    // `rawset` too: the tables a call gets are shared and must stay empty.
    for name in [
        "load",
        "loadfile",
        "dofile",
        "require",
        "collectgarbage",
        "rawset",
    ] {
        g.raw_remove(name)?;
    }
    let string: Table = g.get("string")?;
    string.raw_remove("dump")?;
    super::api::install(&lua)?;
    lua.set_hook(
        HookTriggers::new().every_nth_instruction(1000),
        |_lua, _debug| {
            let over = DEADLINE.with(|d| d.get().is_some_and(|at| Instant::now() > at));
            if over {
                return Err(mlua::Error::runtime("time budget exceeded"));
            }
            Ok(VmState::Continue)
        },
    )?;
    Ok(lua)
}

/// Freezes the globals: reading an unknown one is nil as usual, assigning one is an error.
fn freeze(lua: &Lua) -> mlua::Result<()> {
    let meta = lua.create_table()?;
    meta.set(
        "__newindex",
        lua.create_function(|_, (_t, k, _v): (Value, Value, Value)| -> mlua::Result<()> {
            Err(mlua::Error::runtime(format!(
                "assignment to global `{}`: plugins keep no global state (use locals, or `ctx` within a request)",
                k.to_string().unwrap_or_default()
            )))
        })?,
    )?;
    lua.globals().set_metatable(Some(meta))?;
    Ok(())
}

/// Loads one script in `lua`: its phase functions, or why not (with `path:line:` when Lua
/// gives a line).
pub(super) fn load(lua: &Lua, s: &Script) -> Result<Loaded, String> {
    let chunk = lua
        .load(&*s.code)
        .set_name(format!("={}", s.path.display()))
        .set_mode(mlua::chunk::ChunkMode::Text);
    DEADLINE.with(|d| d.set(Some(Instant::now() + Duration::from_secs(1))));
    let value: mlua::Result<Value> = chunk.eval();
    DEADLINE.with(|d| d.set(None));
    let table = match value.map_err(|e| e.to_string())? {
        Value::Table(t) => t,
        _ => {
            return Err(format!(
                "{}: the script must return a table of phase functions (on_request, on_response, on_log)",
                s.path.display()
            ))
        }
    };
    let phase = |name: &str| -> Result<Option<Function>, String> {
        match table.get::<Value>(name).map_err(|e| e.to_string())? {
            Value::Nil => Ok(None),
            Value::Function(f) => Ok(Some(f)),
            other => Err(format!(
                "{}: `{name}` must be a function, not a {}",
                s.path.display(),
                other.type_name()
            )),
        }
    };
    let loaded = Loaded {
        on_request: phase("on_request")?,
        on_response: phase("on_response")?,
        on_log: phase("on_log")?,
    };
    for k in table.pairs::<Value, Value>() {
        let (k, _) = k.map_err(|e| e.to_string())?;
        let known = matches!(
            k.to_string().as_deref(),
            Ok("on_request" | "on_response" | "on_log" | "read_body")
        );
        if !known {
            return Err(format!(
                "{}: unknown key `{}` in the returned table (on_request, on_response, on_log, read_body)",
                s.path.display(),
                k.to_string().unwrap_or_default()
            ));
        }
    }
    if loaded.on_request.is_none() && loaded.on_response.is_none() && loaded.on_log.is_none() {
        return Err(format!(
            "{}: the returned table has none of on_request, on_response, on_log",
            s.path.display()
        ));
    }
    Ok(loaded)
}

fn build(set: &PluginSet) -> Result<Vm, String> {
    let lua = sandbox(set.memory_limit).map_err(|e| e.to_string())?;
    let mut plugins = HashMap::new();
    for (name, s) in &set.scripts {
        plugins.insert(name.clone(), load(&lua, s)?);
    }
    let metas = super::call::metas(&lua).map_err(|e| e.to_string())?;
    freeze(&lua).map_err(|e| e.to_string())?;
    Ok(Vm {
        lua,
        plugins,
        configs: RefCell::new(HashMap::new()),
        metas,
    })
}

/// Checks a script as the gateway will run it (in a VM of its own): whether it reads the body,
/// and which phases it has (`[on_request, on_response, on_log]`).
pub(super) fn check(s: &Script, memory_limit: usize) -> Result<(bool, [bool; 3]), String> {
    let lua = sandbox(memory_limit).map_err(|e| e.to_string())?;
    let loaded = load(&lua, s)?;
    let t: Value = lua
        .load(&*s.code)
        .set_mode(mlua::chunk::ChunkMode::Text)
        .eval()
        .map_err(|e| e.to_string())?;
    let read_body = match t {
        Value::Table(t) => t.get::<bool>("read_body").unwrap_or(false),
        _ => false,
    };
    Ok((
        read_body,
        [
            loaded.on_request.is_some(),
            loaded.on_response.is_some(),
            loaded.on_log.is_some(),
        ],
    ))
}
