defmodule Convoy.TestSupport.TcpProxy do
  @moduledoc false
  # A TCP proxy on 127.0.0.1 in front of a server, to make it unreachable
  # for a while without losing its state: `block/1` closes the listener and
  # every connection (new ones are refused), `unblock/1` listens again on the
  # same port. Each client connection gets its own upstream connection.
  #
  # Options: `:from_client`, a function `(client, server, bytes) -> rest`
  # that handles what a client sent (by default sent on as it is) and
  # returns the bytes it leaves for later, prepended to the next ones;
  # `:data`, a term kept for the caller (`data/1`).

  use GenServer

  def start_link(upstream_port, options \\ []),
    do: GenServer.start_link(__MODULE__, {upstream_port, options})

  def port(proxy), do: GenServer.call(proxy, :port)
  def data(proxy), do: GenServer.call(proxy, :data)
  def block(proxy), do: GenServer.call(proxy, :block)
  def unblock(proxy), do: GenServer.call(proxy, :unblock)

  # For a `:from_client` function in front of an HTTP/1.1 server: calls
  # `fun.(headers, request)` for each complete request in `buffer` (headers
  # lower-cased; bodies by Content-Length) and returns the rest.
  def each_http_request(buffer, fun) do
    with [head, rest] <- :binary.split(buffer, "\r\n\r\n"),
         headers = http_headers(head),
         length = String.to_integer(Map.get(headers, "content-length", "0")),
         <<body::binary-size(length), rest::binary>> <- rest do
      if Map.has_key?(headers, "transfer-encoding"),
        do: raise("TcpProxy: chunked request bodies are not supported")

      fun.(headers, head <> "\r\n\r\n" <> body)
      each_http_request(rest, fun)
    else
      _incomplete -> buffer
    end
  end

  defp http_headers(head) do
    [_request_line | lines] = String.split(head, "\r\n")

    Map.new(lines, fn line ->
      [name, value] = String.split(line, ":", parts: 2)
      {String.downcase(name), String.trim(value)}
    end)
  end

  @impl true
  def init({upstream, options}) do
    {:ok, listen} = listen(0)
    {:ok, port} = :inet.port(listen)
    from_client = Keyword.get(options, :from_client, &send_on/3)

    state = %{
      upstream: {upstream, from_client},
      data: Keyword.get(options, :data),
      port: port,
      listen: listen,
      pipes: MapSet.new()
    }

    {:ok, accept(state)}
  end

  defp send_on(_client, server, bytes) do
    :gen_tcp.send(server, bytes)
    ""
  end

  defp listen(port),
    do: :gen_tcp.listen(port, [:binary, ip: {127, 0, 0, 1}, active: false, reuseaddr: true])

  defp accept(%{listen: listen} = state) do
    proxy = self()

    spawn_link(fn -> accept_loop(proxy, listen, state.upstream) end)
    state
  end

  defp accept_loop(proxy, listen, upstream) do
    case :gen_tcp.accept(listen) do
      {:ok, client} ->
        pipe = spawn(fn -> pipe(client, upstream) end)
        :ok = :gen_tcp.controlling_process(client, pipe)
        send(pipe, :go)
        send(proxy, {:pipe, pipe})
        accept_loop(proxy, listen, upstream)

      {:error, _} ->
        :ok
    end
  end

  defp pipe(client, {upstream, from_client}) do
    receive do
      :go -> :ok
    end

    case :gen_tcp.connect(~c"127.0.0.1", upstream, [:binary, active: true]) do
      {:ok, server} ->
        :ok = :inet.setopts(client, active: true)
        relay(client, server, from_client, "")

      {:error, _} ->
        :gen_tcp.close(client)
    end
  end

  defp relay(client, server, from_client, rest) do
    receive do
      {:tcp, ^client, data} ->
        rest = from_client.(client, server, rest <> data)
        relay(client, server, from_client, rest)

      {:tcp, ^server, data} ->
        :gen_tcp.send(client, data)
        relay(client, server, from_client, rest)

      {:tcp_closed, _} ->
        close(client, server)

      {:tcp_error, _, _} ->
        close(client, server)

      :close ->
        close(client, server)
    end
  end

  defp close(client, server) do
    :gen_tcp.close(client)
    :gen_tcp.close(server)
  end

  @impl true
  def handle_call(:port, _from, state), do: {:reply, state.port, state}
  def handle_call(:data, _from, state), do: {:reply, state.data, state}

  def handle_call(:block, _from, %{listen: nil} = state), do: {:reply, :ok, state}

  def handle_call(:block, _from, state) do
    :gen_tcp.close(state.listen)
    Enum.each(state.pipes, &send(&1, :close))
    {:reply, :ok, %{state | listen: nil, pipes: MapSet.new()}}
  end

  def handle_call(:unblock, _from, %{listen: nil} = state) do
    {:ok, listen} = listen(state.port)
    {:reply, :ok, accept(%{state | listen: listen})}
  end

  def handle_call(:unblock, _from, state), do: {:reply, :ok, state}

  @impl true
  def handle_info({:pipe, pipe}, %{listen: nil} = state) do
    send(pipe, :close)
    {:noreply, state}
  end

  def handle_info({:pipe, pipe}, state),
    do: {:noreply, %{state | pipes: MapSet.put(state.pipes, pipe)}}

  def handle_info(_other, state), do: {:noreply, state}
end
