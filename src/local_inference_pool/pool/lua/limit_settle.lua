-- A request of a limited key ended: its token reservation (if still in the window) becomes what the
-- server reported using, and the tokens count toward the budget period it ended in.
-- KEYS: 1 the key's token reservations, 2 the tokens those hold, 3 the budget period's counter.
-- ARGV: 1 the reservation's member ('reservation|estimate'), 2 the reservation's name, 3 the tokens
--   used, 4 the estimate, 5 whether the key has a budget (1/0), 6 the budget period's end (epoch ms).
local window = 60000
local used = tonumber(ARGV[3])  -- -1: the server did not say; the reservation stays
if used < 0 then return 0 end
local at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if at and tonumber(at) > now - window then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[1], at, ARGV[2] .. '|' .. used)
  local total = tonumber(redis.call('GET', KEYS[2]) or '0') + used - tonumber(ARGV[4])
  redis.call('SET', KEYS[2], total, 'PX', window + 1000)
end
if ARGV[5] == '1' and used > 0 then
  redis.call('INCRBY', KEYS[3], used)
  -- Kept a day past its period: a request that ends just after may still read it.
  redis.call('PEXPIREAT', KEYS[3], tonumber(ARGV[6]) + 86400000)
end
return 1
