-- transition: move one item of a job to a new state, its state counts with it, in one
-- step. An item leaves a terminal state only by a retry, so a chunk delivered twice cannot
-- count an item twice. Notices, exactly once, the change that finishes the job: after
-- submission ended, every item settled.
--
-- KEYS[1] state       hash: item index -> item state
-- KEYS[2] counts      hash: item state -> how many items are in it
-- KEYS[3] result      hash: item index -> the settled item's record
-- KEYS[4] meta        hash: the job's fields (total, submitted, finished_at)
-- KEYS[5] attempts    hash: item index -> how many times a worker started the item
-- ARGV[1] index       the item
-- ARGV[2] new         the state to move it to
-- ARGV[3] record      the record to store in result ('' stores none)
-- ARGV[4] mode        normal: from any state that is not terminal; queued-only: from
--                     queued only; retry: from a reopenable state, dropping the item's
--                     record and attempts and the job's finished_at; release: from
--                     running only, taking back the attempt its start counted (a
--                     worker's environment failed, not the item)
-- ARGV[5] now         the time to record as finished_at when this change finishes the job
-- ARGV[6] terminal    the terminal item states, comma-separated (contracts.TERMINAL_STATES)
-- ARGV[7] reopenable  the states a retry may move an item out of, comma-separated
--
-- Returns {-1, 0}: no such item; {0, 0}: refused, nothing changed;
-- {1, finished, attempts}: moved. finished is 1 when this change finished the job;
-- attempts is the item's attempt count, counting this one, when new is running, else 0.

local function names(list)
  local ordered, member = {}, {}
  for name in string.gmatch(list, '[^,]+') do
    ordered[#ordered + 1] = name
    member[name] = true
  end
  return ordered, member
end

local index, new, record, mode, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local terminal, final = names(ARGV[6])

local old = redis.call('HGET', KEYS[1], index)
if not old then return {-1, 0} end
if mode == 'retry' then
  local _, reopenable = names(ARGV[7])
  if not reopenable[old] then return {0, 0} end
  redis.call('HDEL', KEYS[3], index)
  redis.call('HDEL', KEYS[5], index)
  redis.call('HDEL', KEYS[4], 'finished_at')
elseif mode == 'queued-only' then
  if old ~= 'queued' then return {0, 0} end
elseif mode == 'release' then
  if old ~= 'running' then return {0, 0} end
  redis.call('HINCRBY', KEYS[5], index, -1)
elseif final[old] then
  return {0, 0}
end

local attempts = 0
if new == 'running' then attempts = redis.call('HINCRBY', KEYS[5], index, 1) end
if old ~= new then
  redis.call('HSET', KEYS[1], index, new)
  redis.call('HINCRBY', KEYS[2], old, -1)
  redis.call('HINCRBY', KEYS[2], new, 1)
end
if record ~= '' then redis.call('HSET', KEYS[3], index, record) end

local finished = 0
if final[new] then
  local settled = 0
  for _, count in ipairs(redis.call('HMGET', KEYS[2], unpack(terminal))) do
    settled = settled + (tonumber(count) or 0)
  end
  local m = redis.call('HMGET', KEYS[4], 'total', 'submitted')
  if m[2] == '1' and settled == tonumber(m[1]) then
    finished = redis.call('HSETNX', KEYS[4], 'finished_at', now)
  end
end
return {1, finished, attempts}
