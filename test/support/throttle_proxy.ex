defmodule Convoy.TestSupport.ThrottleProxy do
  @moduledoc false
  # An HTTP/1.1 proxy on 127.0.0.1 in front of a Kinesis endpoint that
  # throttles one operation: every `every`-th request whose X-Amz-Target
  # names `operation` (GetRecords by default) is answered here with HTTP 400
  # and ProvisionedThroughputExceededException, as Kinesis answers a shard
  # read past its limits; every other request goes through unchanged.
  #
  # A `Convoy.TestSupport.TcpProxy` whose clients' requests go through
  # `requests/4` (`TcpProxy.each_http_request/2`); responses are relayed as
  # they come, unparsed. That suffices because the SDK's HTTP/1.1 client
  # sends a connection's next request only after the last response ended,
  # so a throttling answer never overtakes a response in flight.

  alias Convoy.TestSupport.TcpProxy

  @throttled ~s({"__type":"ProvisionedThroughputExceededException","message":"Rate exceeded"})

  def start_link(upstream_port, options \\ []) do
    # 1: requests of the operation seen, 2: throttled, 3: every.
    counters = :atomics.new(3, signed: false)
    :atomics.put(counters, 3, Keyword.get(options, :every, 3))

    rule = %{
      target: "Kinesis_20131202." <> Keyword.get(options, :operation, "GetRecords"),
      counters: counters
    }

    TcpProxy.start_link(upstream_port,
      from_client: &requests(&1, &2, rule, &3),
      data: counters
    )
  end

  def endpoint(proxy), do: "http://127.0.0.1:#{TcpProxy.port(proxy)}"

  @doc "%{seen: requests of the operation, throttled: those answered with 400}"
  def counts(proxy) do
    counters = TcpProxy.data(proxy)
    %{seen: :atomics.get(counters, 1), throttled: :atomics.get(counters, 2)}
  end

  @doc "Throttles every `every`-th request of the operation from now on (1: all of them)."
  def set_every(proxy, every) when is_integer(every) and every >= 1 do
    :atomics.put(TcpProxy.data(proxy), 3, every)
  end

  defp requests(client, server, rule, buffer) do
    TcpProxy.each_http_request(buffer, fn headers, request ->
      if Map.get(headers, "x-amz-target") == rule.target and throttle?(rule),
        do: :gen_tcp.send(client, throttled_response()),
        else: :gen_tcp.send(server, request)
    end)
  end

  defp throttle?(%{counters: counters}) do
    if rem(:atomics.add_get(counters, 1, 1), :atomics.get(counters, 3)) == 0 do
      :atomics.add(counters, 2, 1)
      true
    else
      false
    end
  end

  defp throttled_response do
    "HTTP/1.1 400 Bad Request\r\n" <>
      "content-type: application/x-amz-json-1.1\r\n" <>
      "x-amzn-requestid: throttle-proxy\r\n" <>
      "content-length: #{byte_size(@throttled)}\r\n\r\n" <> @throttled
  end
end
