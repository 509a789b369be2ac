-- sign-body: signs the request for the service: an HMAC-SHA256 (hex) of the method, the path
-- and the body, keyed by a shared secret, in a header. Reads the body (read_body = true;
-- bodies up to [plugins] max_body).
--   plugin_config.sign-body = { secret = "${SIGNING_SECRET}", header = "x-signature" }
return {
  read_body = true,
  on_request = function(req, ctx)
    local secret = ctx.config.secret
    if not secret or secret == "" then
      error("plugin_config.sign-body.secret is not set")
    end
    local payload = req.method .. "\n" .. req.path .. "\n" .. (req.body or "")
    req.headers[ctx.config.header or "x-signature"] = gatehouse.hmac_sha256(secret, payload)
  end,
}
