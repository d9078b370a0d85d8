-- wrk script for bench/load.sh: every request is the same POST /v1/calls, to the stub, to the
-- nginx proxy and to callgate alike.
--
--   BENCH_KEY=<tenant key>   the bearer key (required; the stub and the proxy ignore it)
--   BENCH_PER_SECOND=1       also count responses per wall-clock second (os.time()) in each
--                            thread and print them from done() as "per-second <unix> <count>".
--                            This defines response(), which makes wrk parse every response in
--                            Lua, so it is used only for the long run, never for saturation.
--   BENCH_PERCENTILES=1      print finer latency percentiles from done() (p50, p90 to p99.9, µs)
--                            as one line, "percentiles us: p50 ... p99.9 ...": wrk's own table
--                            stops at p99. Costs nothing per request.

local key = os.getenv("BENCH_KEY")
if not key or key == "" then
  error("BENCH_KEY is not set")
end

wrk.method = "POST"
wrk.path = "/v1/calls"
wrk.headers["Authorization"] = "Bearer " .. key
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"phone_number": "+14155551234", "agent_id": "agent_abc123", '
  .. '"metadata": {"customer_id": "cust_456", "campaign": "follow_up", "email": "ann@example.com"}}'

if os.getenv("BENCH_PER_SECOND") == "1" then
  local threads = {}

  -- Runs in the main Lua state, once per thread.
  function setup(thread)
    table.insert(threads, thread)
  end

  -- Per-thread globals, read back in done() with thread:get().
  seconds = {}     -- unix second -> responses completed in it
  non2xx = 0

  function response(status, headers, body)
    local t = os.time()
    seconds[t] = (seconds[t] or 0) + 1
    if status < 200 or status > 299 then
      non2xx = non2xx + 1
    end
  end

  function done(summary, latency, requests)
    local total, keys, bad = {}, {}, 0
    for _, thread in ipairs(threads) do
      for t, n in pairs(thread:get("seconds")) do
        if total[t] == nil then
          table.insert(keys, t)
          total[t] = 0
        end
        total[t] = total[t] + n
      end
      bad = bad + thread:get("non2xx")
    end
    table.sort(keys)
    for _, t in ipairs(keys) do
      io.write(string.format("per-second %d %d\n", t, total[t]))
    end
    io.write(string.format("per-second-non2xx %d\n", bad))
  end
end

if os.getenv("BENCH_PERCENTILES") == "1" and os.getenv("BENCH_PER_SECOND") ~= "1" then
  function done(summary, latency, requests)
    local out = {}
    for _, p in ipairs({50, 90, 98, 99, 99.5, 99.9}) do
      table.insert(out, string.format("p%g %.0f", p, latency:percentile(p)))
    end
    io.write("percentiles us: " .. table.concat(out, "  ") .. "\n")
  end
end
