-- response-headers: rewrites response headers: sets those in `set`, removes those in
-- `remove` (what a service should not tell the world, like its server version).
--   plugin_config.response-headers = { set = { "x-frame-options" = "DENY" }, remove = ["server"] }
return {
  on_response = function(res, ctx)
    for _, name in ipairs(ctx.config.remove or {}) do
      res.headers[name] = nil
    end
    for name, value in pairs(ctx.config.set or {}) do
      res.headers[name] = value
    end
  end,
}
