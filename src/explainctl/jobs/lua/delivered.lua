-- delivered: count one delivery of a chunk to a worker. The count expires with the job's
-- records (a sealed job's meta has a TTL), and is not kept once they are gone.
--
-- KEYS[1] deliveries  hash: chunk number -> how many times it was delivered
-- KEYS[2] meta        hash: the job's fields, whose expiry the count follows
-- ARGV[1] chunk       the chunk's number
--
-- Returns the chunk's delivery count, this one included.

local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
elseif ttl == -2 then
  redis.call('DEL', KEYS[1])
end
return n
