-- Marks the outbox message at KEYS[1] delivered if it still exists (never
-- recreating one that expired). Returns 1 when marked, 0 when gone.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'DELIVERED')
return 1
