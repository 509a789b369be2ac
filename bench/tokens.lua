-- wrk script for the JWT scenarios: each request carries the next token of the file named by
-- $TOKENS (one token per line); a file of one token repeats it (the cache-hit scenario).
local tokens = {}
for line in io.lines(os.getenv("TOKENS")) do tokens[#tokens + 1] = line end
local i = 0
request = function()
  i = i % #tokens + 1
  return wrk.format("GET", nil, { Authorization = "Bearer " .. tokens[i] })
end
