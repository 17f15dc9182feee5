-- transition: move one item of a job to a new state, its state counts with it, in one
-- step. An item leaves a terminal state only by a retry, so a chunk delivered twice cannot
-- count an item twice. Notices, exactly once, the change that finishes the job: after
-- submission ended, every item settled.
--
-- An item's state and attempts are one byte each, at its index in two strings: a
-- million-item job keeps 2 MB of them, where a hash field costs some 60 bytes.
--
-- KEYS[1] state       string: byte i is item i's state code (contracts.STATE_CODES)
-- KEYS[2] counts      hash: item state -> how many items are in it
-- KEYS[3] errors      hash: item index -> a failed item's error
-- KEYS[4] meta        hash: the job's fields (total, submitted, finished_at)
-- KEYS[5] attempts    string: byte i is how many times a worker started item i
-- ARGV[1] index       the item
-- ARGV[2] new         the code of the state to move it to
-- ARGV[3] error       the error to store in errors ('' stores none)
-- ARGV[4] mode        normal: from any state that is not terminal; queued-only: from
--                     queued only; retry: from a reopenable state, dropping the item's
--                     error and attempts and the job's finished_at; release: from
--                     running only, taking back the attempt its start counted (a
--                     worker's environment failed, not the item)
-- ARGV[5] now         the time to record as finished_at when this change finishes the job
-- ARGV[6] states      every item state, comma-separated, in the order of codes
-- ARGV[7] codes       the states' codes, one letter each
-- ARGV[8] terminal    the codes of the terminal states (contracts.TERMINAL_STATES)
-- ARGV[9] reopenable  the codes of the states a retry may move an item out of
--
-- Returns {-1, 0}: no such item; {0, 0}: refused, nothing changed;
-- {1, finished, attempts}: moved. finished is 1 when this change finished the job;
-- attempts is the item's attempt count, counting this one, when new is running, else 0.

local index, new, failure, mode, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local codes, terminal, reopenable = ARGV[7], ARGV[8], ARGV[9]
local name, code = {}, {}
local position = 1
for state in string.gmatch(ARGV[6], '[^,]+') do
  local letter = string.sub(codes, position, position)
  name[letter], code[state] = state, letter
  position = position + 1
end
local slot = '#' .. index

local old = redis.call('GETRANGE', KEYS[1], index, index)
if not name[old] then return {-1, 0} end
if mode == 'retry' then
  if not string.find(reopenable, old, 1, true) then return {0, 0} end
  redis.call('HDEL', KEYS[3], index)
  redis.call('BITFIELD', KEYS[5], 'SET', 'u8', slot, 0)
  redis.call('HDEL', KEYS[4], 'finished_at')
elseif mode == 'queued-only' then
  if old ~= code['queued'] then return {0, 0} end
elseif mode == 'release' then
  if old ~= code['running'] then return {0, 0} end
  redis.call('BITFIELD', KEYS[5], 'OVERFLOW', 'SAT', 'INCRBY', 'u8', slot, -1)
elseif string.find(terminal, old, 1, true) then
  return {0, 0}
end

local attempts = 0
if new == code['running'] then
  attempts = redis.call('BITFIELD', KEYS[5], 'OVERFLOW', 'SAT', 'INCRBY', 'u8', slot, 1)[1]
end
if old ~= new then
  redis.call('SETRANGE', KEYS[1], index, new)
  redis.call('HINCRBY', KEYS[2], name[old], -1)
  redis.call('HINCRBY', KEYS[2], name[new], 1)
end
if failure ~= '' then redis.call('HSET', KEYS[3], index, failure) end

local finished = 0
if string.find(terminal, new, 1, true) then
  local settled = 0
  for letter in string.gmatch(terminal, '.') do
    settled = settled + (tonumber(redis.call('HGET', KEYS[2], name[letter])) or 0)
  end
  local m = redis.call('HMGET', KEYS[4], 'total', 'submitted')
  if m[2] == '1' and settled == tonumber(m[1]) then
    finished = redis.call('HSETNX', KEYS[4], 'finished_at', now)
  end
end
return {1, finished, attempts}
