-- Redis's clock, in milliseconds: every process reads the same one.
local now_t = redis.call('TIME')
local now = now_t[1] * 1000 + math.floor(now_t[2] / 1000)
