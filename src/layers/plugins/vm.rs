//! The Lua side: a sandboxed Lua 5.4 VM per worker thread (a `thread_local`, the per-worker
//! way for state that is not `Send`), built from a `PluginSet` and rebuilt when a reload brings
//! another set. Only `string`, `table`, `math` and `utf8` are opened; `load`, `loadfile`,
//! `dofile`, `require`, `collectgarbage`, `rawset` and `string.dump` are removed; `prelude.lua`
//! closes what the limits cannot reach (no `__gc` finalizers, bounded `string.rep`,
//! `table.move` and pattern backtracking) and gives each script an environment of its own in
//! which the globals and the libraries are read-only — so a plugin keeps no global state from
//! one request to the next and cannot change another's. Every call runs under the set's memory
//! limit (per VM) and time budget (per call: an instruction-count hook checks the clock every
//! 1 000 instructions).

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
    /// Makes a read-only view of a table (`ctx.config`).
    pub(super) readonly: Function,
    pub(super) plugins: HashMap<Arc<str>, Loaded>,
    /// The `ctx` metatables, built once per (route, plugin) use: keyed by the address of the
    /// use's config, which the use holds (an `Arc`) for as long as it lives.
    pub(super) configs: RefCell<HashMap<u64, Table>>,
    /// The `req` and `res` metatables.
    pub(super) metas: super::call::Metas,
}

type Built = Result<Rc<Vm>, String>;

thread_local! {
    /// This thread's VMs: the newest sets' (a reload briefly has two in use); a set whose VM
    /// could not be built is remembered too (its error answers without building again).
    static VMS: RefCell<Vec<(u64, Built)>> = const { RefCell::new(Vec::new()) };
    /// When the call running now must end.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` with this thread's VM for `set` (built on first use).
pub(super) fn with_vm<R>(set: &PluginSet, f: impl FnOnce(&Vm) -> R) -> Result<R, String> {
    let vm = VMS.with(|vms| -> Built {
        let mut vms = vms.borrow_mut();
        if let Some((_, vm)) = vms.iter().find(|(g, _)| *g == set.id) {
            return vm.clone();
        }
        let vm = build(set).map(Rc::new);
        vms.push((set.id, vm.clone()));
        // Two sets at most: the one a reload replaced goes once the next one comes.
        if vms.len() > 2 {
            drop(vms.remove(0));
        }
        vm
    })?;
    Ok(f(&vm))
}

/// Drops this thread's VM for `set` (it ran out of memory: the next call builds a new one).
pub(super) fn discard(set: &PluginSet) {
    VMS.with(|vms| vms.borrow_mut().retain(|(g, _)| *g != set.id));
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

/// A new sandboxed VM with the set's limits, and the prelude's two functions (a script's
/// environment, a read-only view).
pub(super) fn sandbox(memory_limit: usize) -> mlua::Result<(Lua, Function, Function)> {
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
    let (environment, readonly): (Function, Function) = lua
        .load(include_str!("prelude.lua"))
        .set_name("=prelude")
        .call(memory_limit)?;
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
    Ok((lua, environment, readonly))
}

/// Loads one script in `lua`: its phase functions, or why not (with `path:line:` when Lua
/// gives a line).
pub(super) fn load(
    lua: &Lua,
    environment: &Function,
    s: &Script,
) -> Result<(Loaded, bool), String> {
    let env: Table = environment.call(()).map_err(|e| e.to_string())?;
    let chunk = lua
        .load(&*s.code)
        .set_name(format!("={}", s.path.display()))
        .set_environment(env)
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
    let read_body = match table.get::<Value>("read_body").map_err(|e| e.to_string())? {
        Value::Nil => false,
        Value::Boolean(b) => b,
        other => {
            return Err(format!(
                "{}: `read_body` must be true or false, not a {}",
                s.path.display(),
                other.type_name()
            ))
        }
    };
    Ok((loaded, read_body))
}

fn build(set: &PluginSet) -> Result<Vm, String> {
    build_scripts(set.scripts.values(), set.memory_limit)
}

/// A VM with every script of a set loaded (what a worker runs; also how a set is checked).
pub(super) fn build_scripts<'a>(
    scripts: impl IntoIterator<Item = &'a Script>,
    memory_limit: usize,
) -> Result<Vm, String> {
    let (lua, environment, readonly) = sandbox(memory_limit).map_err(|e| e.to_string())?;
    let mut plugins = HashMap::new();
    for s in scripts {
        plugins.insert(s.name.clone(), load(&lua, &environment, s)?.0);
    }
    let metas = super::call::metas(&lua).map_err(|e| e.to_string())?;
    Ok(Vm {
        lua,
        readonly,
        plugins,
        configs: RefCell::new(HashMap::new()),
        metas,
    })
}

/// Checks a script as the gateway will run it (in a VM of its own): whether it reads the body,
/// and which phases it has (`[on_request, on_response, on_log]`).
pub(super) fn check(s: &Script, memory_limit: usize) -> Result<(bool, [bool; 3]), String> {
    let (lua, environment, _) = sandbox(memory_limit).map_err(|e| e.to_string())?;
    let (loaded, read_body) = load(&lua, &environment, s)?;
    Ok((
        read_body,
        [
            loaded.on_request.is_some(),
            loaded.on_response.is_some(),
            loaded.on_log.is_some(),
        ],
    ))
}
