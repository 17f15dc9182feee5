-- submitted: submission of a job has ended (every chunk is queued). Notices when that
-- finishes the job, because its workers settled every item before submission ended.
--
-- KEYS[1] meta      hash: the job's fields (total, submitted, finished_at)
-- KEYS[2] counts    hash: item state -> how many items are in it
-- ARGV[1] now       the time to record as finished_at when this finishes the job
-- ARGV[2] terminal  the terminal item states, comma-separated (contracts.TERMINAL_STATES)
--
-- Returns 1 when this finished the job (finished_at set here), else 0.

local terminal = {}
for name in string.gmatch(ARGV[2], '[^,]+') do terminal[#terminal + 1] = name end

redis.call('HSET', KEYS[1], 'submitted', '1')
local settled = 0
for _, count in ipairs(redis.call('HMGET', KEYS[2], unpack(terminal))) do
  settled = settled + (tonumber(count) or 0)
end
if settled == tonumber(redis.call('HGET', KEYS[1], 'total') or '0') then
  return redis.call('HSETNX', KEYS[1], 'finished_at', ARGV[1])
end
return 0
