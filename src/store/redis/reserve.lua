-- Reserves KEYS[1] with the INPROGRESS record ARGV[1] (JSON), expiring at
-- ARGV[3] (epoch seconds), unless the record stored there may not be
-- replaced at ARGV[2] (epoch milliseconds) by a reservation of execution
-- ARGV[4]: the rule of IdempotencyRecord::may_be_replaced_by. An item without
-- a numeric expiration is never replaced (the client reports it malformed).
-- Returns {1, replaced record or false} when written, {0, blocking record}
-- when refused: one round trip either way.
local old = redis.call('GET', KEYS[1])
if old then
  local now_ms = tonumber(ARGV[2])
  local decoded, r = pcall(cjson.decode, old)
  local replaceable = false
  if decoded and type(r) == 'table' and type(r.expiration) == 'number' then
    if r.expiration < math.floor(now_ms / 1000) then
      replaceable = true
    elseif r.status == 'INPROGRESS'
      and type(r.in_progress_expiration) == 'number'
      and r.in_progress_expiration < now_ms
      and (r.execution == nil or r.execution == cjson.null or r.execution == ''
           or r.execution == ARGV[4]) then
      replaceable = true
    end
  end
  if not replaceable then
    return {0, old}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EXAT', ARGV[3])
return {1, old or false}
