-- Every script on one backend shares this layout.
-- KEYS: 1 leases (zset id -> expiry), 2 owners (hash id -> model), 3 models (hash model -> leases),
--   4 resident (list, most recent first: the models granted there lately), 5 newest (the arrival of
--   the latest request granted anywhere), 6 active (hash model -> leases on every backend), then
--   ARGV[8] queues (hash process -> its head, one per model the backend serves), then the script's
--   own keys.
-- ARGV: 1 this process's lease prefix, 2 this process, 3-4 the priority and age (ms) of the request
--   the reply's ``reserved`` is for, 5 starvation bound (ms), 6 max_models, 7 capacity, 8 queues,
--   then the script's own.
local now_t = redis.call('TIME')
local now = now_t[1] * 1000 + math.floor(now_t[2] / 1000)
local nq = tonumber(ARGV[8])
local own = 6 + nq  -- KEYS after this one are the script's own

local function forget(model)  -- one lease of ``model`` here is gone
  if redis.call('HINCRBY', KEYS[3], model, -1) <= 0 then redis.call('HDEL', KEYS[3], model) end
  if redis.call('HINCRBY', KEYS[6], model, -1) <= 0 then redis.call('HDEL', KEYS[6], model) end
end

local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(dead) do
  local model = redis.call('HGET', KEYS[2], id)
  if model then forget(model) end
  redis.call('HDEL', KEYS[2], id)
end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end

-- A place in the fleet's queue: priority first, then arrival on Redis's clock.
local function score(priority, arrival)
  return (100 - math.max(-100, math.min(100, priority))) * 1e13 + arrival
end

-- How many of ``free`` slots here the other processes' waiters that came before (priority, age)
-- have a claim to: each process's head of each model queue whose model the backend can take now
-- without a swap (batching by model, the drain guard). A head that cannot, and has starved (it
-- arrived the starvation bound or more before) while its model runs nowhere, holds every slot:
-- the backend drains for it. Heads of processes that stopped renewing are dropped.
local function ahead(priority, age, free)
  if free <= 0 then return 0 end
  local arrival = now - age
  local mine = score(priority, arrival)
  local bound = tonumber(ARGV[5])
  local max_models = tonumber(ARGV[6])
  local active = redis.call('HLEN', KEYS[3])
  local resident = redis.call('LRANGE', KEYS[4], 0, -1)
  local count = 0
  for k = 7, own do
    local model = string.match(KEYS[k], ':queue:(.*)$')
    local fits = redis.call('HEXISTS', KEYS[3], model) == 1
    if not fits and active < max_models then
      fits = #resident < max_models
      for _, name in ipairs(resident) do
        if name == model then fits = true end
      end
    end
    local heads = redis.call('HGETALL', KEYS[k])
    for i = 1, #heads, 2 do
      local s, a, e = string.match(heads[i + 1], '^(%S+) (%S+) (%S+)')
      if tonumber(e) <= now then
        redis.call('HDEL', KEYS[k], heads[i])
      elseif heads[i] ~= ARGV[2] and tonumber(s) < mine then
        if fits then
          count = count + 1
          if count >= free then return free end
        elseif arrival - tonumber(a) >= bound and not redis.call('HGET', KEYS[6], model) then
          return free
        end
      end
    end
  end
  return count
end

-- The reply: the others' leases, the slots held for earlier waiters elsewhere, how long ago the
-- newest granted request arrived (ms, -1: never), then the others' leases per model. A lease id
-- starts with its process's prefix, so the store itself tells ours from theirs.
local function fleet(reserved)
  local count, models, n = 0, {}, #ARGV[1]
  local entries = redis.call('HGETALL', KEYS[2])
  for i = 1, #entries, 2 do
    if string.sub(entries[i], 1, n) ~= ARGV[1] then
      count = count + 1
      models[entries[i + 1]] = (models[entries[i + 1]] or 0) + 1
    end
  end
  local newest = redis.call('GET', KEYS[5])
  local reply = {count, reserved, newest and (now - tonumber(newest)) or -1}
  for model, leases in pairs(models) do
    table.insert(reply, model)
    table.insert(reply, leases)
  end
  return reply
end

local function free() return tonumber(ARGV[7]) - redis.call('ZCARD', KEYS[1]) end
