-- Own ARGV: 9 lease id, 10 channel, 11 message, 12 ttl ms; own KEYS: the lease's tombstone, the
-- key's leases (if the key has a cap).
-- The tombstone: a claim cancelled on its way, or a renewal that read the lease just before, may
-- still reach Redis after this release; both find it and leave the lease released.
redis.call('SET', KEYS[own + 1], 1, 'PX', ARGV[12])
if #KEYS > own + 1 then redis.call('ZREM', KEYS[own + 2], ARGV[9]) end
if redis.call('ZREM', KEYS[1], ARGV[9]) == 1 then
  local model = redis.call('HGET', KEYS[2], ARGV[9])
  if model then forget(model) end
  redis.call('HDEL', KEYS[2], ARGV[9])
  redis.call('PUBLISH', ARGV[10], ARGV[11])
end
return fleet(ahead(tonumber(ARGV[3]), tonumber(ARGV[4]), free()))
