-- This process's head of each model queue. KEYS: the model queues; ARGV: 1 process, 2 ttl ms,
-- 3 channel ('' to tell nobody), then per queue: priority ('' when nothing waits), age ms, waiting.
local now_t = redis.call('TIME')
local now = now_t[1] * 1000 + math.floor(now_t[2] / 1000)
for k = 1, #KEYS do
  local priority, age, waiting = ARGV[1 + 3 * k], ARGV[2 + 3 * k], ARGV[3 + 3 * k]
  if priority == '' then
    redis.call('HDEL', KEYS[k], ARGV[1])
  else
    local arrival = now - tonumber(age)
    local place = (100 - math.max(-100, math.min(100, tonumber(priority)))) * 1e13 + arrival
    redis.call('HSET', KEYS[k], ARGV[1],
      string.format('%.0f %.0f %.0f %d', place, arrival, now + tonumber(ARGV[2]), tonumber(waiting)))
  end
end
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[1]) end
return 1
