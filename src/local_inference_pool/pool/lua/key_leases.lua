-- A key's leases fleet-wide (its max_concurrent): a sorted set of lease ids scored by expiry. The
-- leases of processes that died expire out of it; the others' are those without our prefix.
local function key_leases(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local others, n = 0, #ARGV[1]
  for _, id in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if string.sub(id, 1, n) ~= ARGV[1] then others = others + 1 end
  end
  return redis.call('ZCARD', key), others
end
