-- The other processes' leases of each key: KEYS the keys' leases; ARGV 1 this process's prefix.
local reply = {}
for k = 1, #KEYS do
  local _, others = key_leases(KEYS[k])
  table.insert(reply, others)
end
return reply
