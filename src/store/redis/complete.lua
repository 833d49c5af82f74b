-- Replaces the record at KEYS[1] with ARGV[2] (JSON, expiring at ARGV[3],
-- epoch seconds) only if the stored record is owned by ARGV[1], and writes
-- the outbox messages KEYS[2..] in the same step: each a hash of its key,
-- derived key and message (ARGV[4..], three per message), PENDING, with the
-- record's expiration. Returns 1 when written, 0 when not the owner's.
local old = redis.call('GET', KEYS[1])
if not old then
  return 0
end
local decoded, r = pcall(cjson.decode, old)
if not decoded or type(r) ~= 'table' or r.owner ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'EXAT', ARGV[3])
local arg = 4
for i = 2, #KEYS do
  redis.call('HSET', KEYS[i], 'key', ARGV[arg], 'derived_key', ARGV[arg + 1],
    'message', ARGV[arg + 2], 'status', 'PENDING', 'expiration', ARGV[3])
  redis.call('EXPIREAT', KEYS[i], ARGV[3])
  arg = arg + 3
end
return 1
