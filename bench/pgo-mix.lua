-- wrk script for scripts/pgo-build.sh: the traffic a profile-guided build is trained on. Unlike
-- bench/calls.lua (one request, the benchmark's), it cycles through a mix, so that the profile is
-- of the gateway's work and not of one request:
--   - calls admitted: numbers in six US and Canadian areas, metadata with and without personal
--     data (an e-mail, a card number, a key the policy drops), with and without `from_number`,
--     `record`, `max_duration`;
--   - calls refused by policy: a premium-rate prefix, a number on the do-not-call list, a region
--     not allowed, an agent not allowed, a caller id not allowed, an invalid number;
--   - requests refused before the policy: two schema violations, malformed JSON, a wrong key;
--   - reads: GET /v1/calls (the tenant's list) and GET /healthz.
-- Of every 48 requests, 10 are refused (the nine refusals and the wrong key). The script prints
-- that share when the run ends ("mix: 10 of 48 refused"), and pgo-build.sh checks wrk's count
-- against it. Each wrk thread cycles through the 48 on its own.
--
--   BENCH_KEY=<tenant key>   the bearer key of the benchmark tenant (required)

local key = os.getenv("BENCH_KEY")
if not key or key == "" then
  error("BENCH_KEY is not set")
end

local auth = { ["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json" }
local bad_auth = { ["Authorization"] = "Bearer not-a-key", ["Content-Type"] = "application/json" }

local function call(body, headers)
  return wrk.format("POST", "/v1/calls", headers or auth, body)
end

local admitted = {
  '{"phone_number": "+14155551234", "agent_id": "agent_abc123", '
    .. '"metadata": {"customer_id": "cust_456", "campaign": "follow_up", "email": "ann@example.com"}}',
  '{"phone_number": "+12125550147", "agent_id": "agent_abc123", "from_number": "+18005550000", '
    .. '"record": false, "max_duration": 300, "metadata": {"customer_id": "cust_9"}}',
  '{"phone_number": "+13125550188", "agent_id": "agent_abc123", '
    .. '"metadata": {"note": "card 4111 1111 1111 1111 on file", "ssn": "123-45-6789"}}',
  '{"phone_number": "+16045550123", "agent_id": "agent_abc123", "max_duration": 120}',
  '{"phone_number": "+17135550111", "agent_id": "agent_abc123", '
    .. '"metadata": {"tier": "gold", "visits": 3, "vip": true, "referrer": null, "contact": "bo@example.org"}}',
  '{"phone_number": "+14165550175", "agent_id": "agent_abc123", "record": true, '
    .. '"metadata": {"customer_id": "cust_77", "campaign": "renewal"}}',
}

local refused = {
  '{"phone_number": "+19005550100", "agent_id": "agent_abc123"}',
  '{"phone_number": "+12125550100", "agent_id": "agent_abc123"}',
  '{"phone_number": "+442071838750", "agent_id": "agent_abc123"}',
  '{"phone_number": "+14155551234", "agent_id": "agent_other"}',
  '{"phone_number": "+14155551234", "agent_id": "agent_abc123", "from_number": "+18005559999"}',
  '{"phone_number": "+1415555", "agent_id": "agent_abc123"}',
  '{"phone_number": "+14155551234"}',
  '{"phone_number": "+14155551234", "agent_id": "agent_abc123", "max_duration": "long"}',
  '{"phone_number": "+14155551234", ',
}

local requests = {}

-- Per cycle: four admitted calls before each refusal, then two reads and the wrong key.
local per_cycle = #refused * 5 + 3
local refused_per_cycle = #refused + 1

function init(args)
  -- Four admitted calls before each refusal, then the two reads and the wrong key: 36 admitted
  -- calls, 9 refusals, 2 reads and 1 wrong key (401) in every 48.
  local a = 1
  for _, body in ipairs(refused) do
    for _ = 1, 4 do
      table.insert(requests, call(admitted[a]))
      a = a % #admitted + 1
    end
    table.insert(requests, call(body))
  end
  table.insert(requests, wrk.format("GET", "/v1/calls?limit=20", auth))
  table.insert(requests, wrk.format("GET", "/healthz"))
  table.insert(requests, call(admitted[1], bad_auth))
end

local n = 0

function request()
  n = n % #requests + 1
  return requests[n]
end

function done(summary, latency, _)
  io.write(string.format("mix: %d of %d refused\n", refused_per_cycle, per_cycle))
end
