-- Deletes the record at KEYS[1] if ARGV[1] owns it. Returns 1 when deleted or
-- already gone (a repeated release), 0 when another owner holds it.
local old = redis.call('GET', KEYS[1])
if not old then
  return 1
end
local decoded, r = pcall(cjson.decode, old)
if decoded and type(r) == 'table' and r.owner == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
