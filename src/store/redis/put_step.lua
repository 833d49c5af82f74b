-- Journals a step at KEYS[1] (a hash: name ARGV[1], data ARGV[2]) expiring
-- at ARGV[3] (epoch seconds), unless an entry is there: the first entry wins.
-- Returns false when written, the stored entry's {name, data, expiration}
-- otherwise.
local stored = redis.call('HMGET', KEYS[1], 'name', 'data', 'expiration')
if stored[1] then
  return stored
end
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'data', ARGV[2], 'expiration', ARGV[3])
redis.call('EXPIREAT', KEYS[1], ARGV[3])
return false
