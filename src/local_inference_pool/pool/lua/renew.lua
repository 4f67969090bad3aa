-- Own ARGV: 9 ttl ms, then (lease id, model, '1' if its key has a cap) triples; own KEYS: each
-- triple's tombstone and its key's leases.
for i = 10, #ARGV, 3 do
  local tombstone = KEYS[own + 1 + 2 * (i - 10) / 3]
  if redis.call('EXISTS', tombstone) == 0 then
    if redis.call('ZADD', KEYS[1], now + tonumber(ARGV[9]), ARGV[i]) == 1 then
      redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
      redis.call('HINCRBY', KEYS[3], ARGV[i + 1], 1)
      redis.call('HINCRBY', KEYS[6], ARGV[i + 1], 1)
    end
    if ARGV[i + 2] == '1' then
      redis.call('ZADD', KEYS[own + 2 + 2 * (i - 10) / 3], now + tonumber(ARGV[9]), ARGV[i])
    end
  end
end
return fleet(ahead(tonumber(ARGV[3]), tonumber(ARGV[4]), free()))
