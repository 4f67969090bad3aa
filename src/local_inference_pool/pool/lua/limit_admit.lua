-- One request of one client key against its limits, as core/limits.py decides in one process:
-- requests and tokens per sliding minute (exact: every admitted request's time is kept until it is
-- a minute old), and tokens per budget period (counted when requests end).
-- KEYS: 1 the key's requests (sorted set: reservation -> when admitted, ms),
--   2 its token reservations (sorted set: 'reservation|tokens' -> when admitted, ms),
--   3 the tokens those hold (a counter), 4 the tokens of its current budget period (a counter).
-- ARGV: 1 rpm (-1: none), 2 tpm (-1: none), 3 the tokens this request reserves, 4 its reservation's
--   name (unique in the fleet), 5 the budget (-1: none), 6 the budget period's end (epoch ms).
-- Returns {verdict, retry after ms, requests in the window, ms until its newest leaves, tokens in
-- the window, ms until its newest leaves, tokens of the period}; verdict is 'ok', 'requests',
-- 'tokens' or 'budget', and the figures are as they stand after the request (when admitted).
local window = 60000
local horizon = now - window
local rpm, tpm, estimate = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local budget, period_end = tonumber(ARGV[5]), tonumber(ARGV[6])

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', horizon)
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', horizon)
if #expired > 0 then
  for _, member in ipairs(expired) do
    total = total - tonumber(string.match(member, '|(%-?%d+)$'))
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', horizon)
  redis.call('SET', KEYS[3], total, 'PX', window + 1000)
end
local spent = tonumber(redis.call('GET', KEYS[4]) or '0')

local function newest(set)
  local last = redis.call('ZRANGE', set, -1, -1, 'WITHSCORES')
  if #last == 0 then return 0 end
  return math.max(0, tonumber(last[2]) + window - now)
end

local function answer(verdict, retry)
  return {verdict, retry, redis.call('ZCARD', KEYS[1]), newest(KEYS[1]), total, newest(KEYS[2]), spent}
end

if rpm >= 0 then
  local count = redis.call('ZCARD', KEYS[1])
  if count >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return answer('requests', #oldest == 0 and -1 or math.max(0, tonumber(oldest[2]) + window - now))
  end
end
if tpm >= 0 and total + estimate > tpm then
  local retry = -1  -- never: the request alone is over the limit
  if estimate <= tpm then
    retry = 0
    local left = total
    local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      left = left - tonumber(string.match(entries[i], '|(%-?%d+)$'))
      if left + estimate <= tpm then
        retry = math.max(0, tonumber(entries[i + 1]) + window - now)
        break
      end
    end
  end
  return answer('tokens', retry)
end
if budget >= 0 and spent >= budget then
  return answer('budget', math.max(0, period_end - now))
end
if rpm >= 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window + 1000)
end
if tpm >= 0 then
  redis.call('ZADD', KEYS[2], now, ARGV[4] .. '|' .. estimate)
  total = total + estimate
  redis.call('SET', KEYS[3], total, 'PX', window + 1000)
  redis.call('PEXPIRE', KEYS[2], window + 1000)
end
return answer('ok', 0)
