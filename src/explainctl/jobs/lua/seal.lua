-- seal: start the retention clock of a finished job whose manifest is written. Its
-- records expire after a TTL and a small index entry is written to outlive them. Only a
-- finished job is sealed, so a retry that reopened it in between keeps its records.
--
-- KEYS[1] meta       hash: the job's fields; the job is finished when it has finished_at
-- KEYS[2] index      string: the job's index entry, written here
-- KEYS[3..] records  the job's other record keys, which expire with meta
-- ARGV[1] ttl        seconds the records are kept; 0: forever (nothing expires)
-- ARGV[2] index_ttl  seconds the index entry is kept (when ttl > 0)
-- ARGV[3] document   the index entry: what the job asked and its final status (job.json)
--
-- Returns 1 when sealed, 0 when the job is not finished.

if not redis.call('HGET', KEYS[1], 'finished_at') then return 0 end
local ttl = tonumber(ARGV[1])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  for i = 3, #KEYS do redis.call('EXPIRE', KEYS[i], ttl) end
  redis.call('SET', KEYS[2], ARGV[3], 'EX', tonumber(ARGV[2]))
else
  redis.call('SET', KEYS[2], ARGV[3])
end
return 1
