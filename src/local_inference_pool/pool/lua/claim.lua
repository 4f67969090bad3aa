-- Own ARGV: 9 lease id, 10 model, 11 ttl ms, 12 priority, 13 age ms, 14 '1' to skip the queue (a
-- retry that already waited), 15 backend name, 16 session ttl ms ('0': no session), 17 '1' to refuse
-- the claim when the fleet served the session elsewhere, 18 the key's max_concurrent ('0': none);
-- own KEYS: the lease's tombstone (left by a release that came before its claim: that claim must
-- not land), the session's key, the key's leases.
-- Reply: the outcome (1 won, 0 full, 2 another model active, 3 an earlier waiter elsewhere,
-- 4 released already, 5 the session's backend is another, 6 the key holds its max_concurrent),
-- the session's backend ('' if none), the other processes' leases of the key, then the fleet view.
local model, max_models = ARGV[10], tonumber(ARGV[6])
local room = free()
local outcome = 1
local session = ''
local cap = tonumber(ARGV[18])
local held, others = 0, 0
if cap > 0 then held, others = key_leases(KEYS[own + 3]) end
if ARGV[16] ~= '0' then session = redis.call('GET', KEYS[own + 2]) or '' end
if redis.call('EXISTS', KEYS[own + 1]) == 1 then outcome = 4
elseif ARGV[17] == '1' and session ~= '' and session ~= ARGV[15] then outcome = 5
elseif cap > 0 and held >= cap then outcome = 6
elseif room <= 0 then outcome = 0
elseif redis.call('HEXISTS', KEYS[3], model) == 0 and redis.call('HLEN', KEYS[3]) >= max_models then
  outcome = 2
end
local before = 0
if ARGV[14] ~= '1' then before = ahead(tonumber(ARGV[12]), tonumber(ARGV[13]), room) end
if outcome == 1 and before >= room then outcome = 3 end
if outcome == 1 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[11]), ARGV[9])
  redis.call('HSET', KEYS[2], ARGV[9], model)
  redis.call('HINCRBY', KEYS[3], model, 1)
  redis.call('HINCRBY', KEYS[6], model, 1)
  redis.call('LREM', KEYS[4], 0, model)
  redis.call('LPUSH', KEYS[4], model)
  redis.call('LTRIM', KEYS[4], 0, max_models - 1)
  local arrival = now - tonumber(ARGV[13])
  if arrival > tonumber(redis.call('GET', KEYS[5]) or '0') then redis.call('SET', KEYS[5], arrival) end
  if ARGV[16] ~= '0' then redis.call('SET', KEYS[own + 2], ARGV[15], 'PX', ARGV[16]) end
  if cap > 0 then redis.call('ZADD', KEYS[own + 3], now + tonumber(ARGV[11]), ARGV[9]) end
end
local reply = fleet(before)
table.insert(reply, 1, others)
table.insert(reply, 1, session)
table.insert(reply, 1, outcome)
return reply
