-- Run once in each plugin VM, before any plugin, with the VM's memory limit as its argument.
-- It closes what the count hook and the memory limit cannot reach, and returns two functions:
-- one making a script's environment (globals read-only, the libraries read-only), one making
-- a read-only view of a table (ctx.config). Nothing here is reachable by plugins afterwards.
local limit = ...
local rawget, rawlen, type, error, select, next, pairs, tostring = rawget, rawlen, type, error, select, next, pairs, tostring
local raw_setmetatable, getmetatable = setmetatable, getmetatable
local tointeger, max = math.tointeger, math.max
local s_rep, s_find, s_match, s_gmatch, s_gsub, t_move = string.rep, string.find, string.match, string.gmatch, string.gsub, table.move

-- A finalizer runs with the hook off, at any later allocation (another plugin's call, or none):
-- no metatable with __gc.
setmetatable = function(t, m)
  if type(m) == "table" and rawget(m, "__gc") ~= nil then
    error("metatables with __gc are not allowed in plugins", 2)
  end
  return raw_setmetatable(t, m)
end

-- Loops inside C functions do not see the count hook: bound them.
string.rep = function(s, n, sep)
  local k = tointeger(n)
  if k and k > 0 then
    local each = #tostring(s) + (sep ~= nil and #tostring(sep) or 0)
    if max(each, 1) * k > limit then
      error("string.rep: the result would be larger than the plugin memory limit", 2)
    end
  end
  return s_rep(s, n, sep)
end
table.move = function(a1, f, e, t, a2)
  local fi, ei = tointeger(f), tointeger(e)
  if fi and ei and ei - fi > 1000000 then
    error("table.move: more than 1 000 000 elements", 2)
  end
  return t_move(a1, f, e, t, a2)
end
-- Lua patterns backtrack: a subject of n bytes and q quantifiers can take n^(q+1) steps.
local function guard(name, s, p)
  local q = select(2, s_gsub(tostring(p), "[%*%+%-%?]", ""))
  if s_find(tostring(p), "^%^") == nil then q = q + 1 end
  if q > 0 and (#tostring(s)) ^ q > 1e8 then
    error(name .. ": pattern too costly for a subject this long (use fewer of * + - ?, anchor it with ^, or plain find)", 3)
  end
end
string.find = function(s, p, init, plain)
  if not plain then guard("string.find", s, p) end
  return s_find(s, p, init, plain)
end
string.match = function(s, p, init) guard("string.match", s, p) return s_match(s, p, init) end
string.gmatch = function(s, p, init) guard("string.gmatch", s, p) return s_gmatch(s, p, init) end
string.gsub = function(s, p, r, n) guard("string.gsub", s, p) return s_gsub(s, p, r, n) end

-- The string metatable (its __index is the string library) is not to be changed.
getmetatable("").__metatable = false

local function readonly(t)
  return raw_setmetatable({}, {
    __index = t,
    __newindex = function(_, k)
      error("cannot assign `" .. tostring(k) .. "`: this table is read-only", 2)
    end,
    __len = function() return rawlen(t) end,
    __pairs = function() return next, t, nil end,
    __metatable = false,
  })
end

local function deep_readonly(t)
  local copy = {}
  for k, v in pairs(t) do
    if type(v) == "table" then copy[k] = deep_readonly(v) else copy[k] = v end
  end
  return readonly(copy)
end

local shared = {}
for k, v in pairs(_G) do
  if k ~= "_G" then
    if type(v) == "table" then shared[k] = readonly(v) else shared[k] = v end
  end
end

local function environment()
  return raw_setmetatable({}, {
    __index = shared,
    __newindex = function(_, k)
      error("assignment to global `" .. tostring(k) .. "`: plugins keep no global state (use locals, or `ctx` within a request)", 2)
    end,
    __metatable = false,
  })
end

return environment, deep_readonly
