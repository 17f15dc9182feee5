-- run: take the lease of a chunk run, unless another run of the same chunk holds a live
-- one. The runner key and the lease are written in the same step, so a runner key always
-- names a lease that can expire.
--
-- KEYS[1] runner   string: the lease running the chunk now, as '<lease>|<host>|<pid>'
-- KEYS[2] leases   sorted set: lease -> its expiry (Redis time, seconds)
-- ARGV[1] lease    this run's lease (the leases member)
-- ARGV[2] expiry   when this run's lease expires
-- ARGV[3] now      Redis's time now
-- ARGV[4] seconds  the lease's term: the runner key expires after it too
-- ARGV[5] dead     a runner value known to name a dead holder (taken over at once), or ''
-- ARGV[6] me       this process, as '<host>|<pid>'
--
-- Returns 1 when this run holds the chunk now, 0 when another run's live lease holds it.

local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[5] then
  local score = redis.call('ZSCORE', KEYS[2], string.match(holder, '^[^|]*'))
  if score and tonumber(score) > tonumber(ARGV[3]) then return 0 end
end
local ttl = math.max(1, math.floor(tonumber(ARGV[4])))
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[6], 'EX', ttl)
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
