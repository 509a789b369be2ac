-- deny-bots: answers 403 to clients from listed addresses or CIDR blocks, or whose
-- User-Agent contains a listed word (case-insensitive), without calling the backend.
--   plugin_config.deny-bots = { cidrs = ["203.0.113.0/24"], user_agents = ["badbot"] }
local function denied(ctx)
  return {
    status = 403,
    headers = { ["content-type"] = "application/problem+json" },
    -- The request id is letters, digits and -_.: only: safe inside the JSON string.
    body = '{"type":"about:blank","title":"Denied","status":403,"code":"denied","request_id":"'
      .. ctx.request_id .. '"}',
  }
end

return {
  on_request = function(req, ctx)
    local cidrs = ctx.config.cidrs or {}
    if #cidrs > 0 and gatehouse.ip_in(ctx.client_ip, cidrs) then
      return denied(ctx)
    end
    local ua = string.lower(req.headers["user-agent"] or "")
    for _, word in ipairs(ctx.config.user_agents or {}) do
      if string.find(ua, string.lower(word), 1, true) then
        return denied(ctx)
      end
    end
  end,
}
