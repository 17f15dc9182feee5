-- claim: take an expired lease for this reaper, pushing its expiry out so that no other
-- reaper takes it while this one sends its chunk again.
--
-- KEYS[1] leases   sorted set: lease -> its expiry (Redis time, seconds)
-- ARGV[1] lease    the lease (the leases member)
-- ARGV[2] now      Redis's time now
-- ARGV[3] expiry   the claimed lease's new expiry
--
-- Returns 1 when this caller claimed it, 0 when it is gone or not expired (claimed by
-- another reaper, or renewed).

local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
