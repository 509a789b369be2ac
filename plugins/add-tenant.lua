-- add-tenant: copies a JWT claim into a request header for the service.
--   plugins = ["add-tenant"]
--   plugin_config.add-tenant = { claim = "tenant", header = "x-tenant" }
-- Without the claim (or without a JWT) the header is removed, so a client cannot set it.
return {
  on_request = function(req, ctx)
    local header = ctx.config.header or "x-tenant"
    local claim = ctx.config.claim or "tenant"
    local value = ctx.claims and ctx.claims[claim]
    if type(value) == "string" or type(value) == "number" then
      req.headers[header] = tostring(value)
    else
      req.headers[header] = nil
    end
  end,
}
