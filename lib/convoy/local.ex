defmodule Convoy.Local do
  @moduledoc """
  An embedded Kinesis for development, tests and the demo: the
  `convoy_local` binary of this repository, which serves the `ferrokinesis`
  emulator on 127.0.0.1 only. No AWS account is needed.

  The emulator runs as a port owned by this process; it stops when this
  process stops (it also exits by itself if the VM dies).

  ## Example

      {:ok, local} = Convoy.Local.start_link()
      endpoint = Convoy.Local.endpoint(local)
      :ok = Convoy.Local.create_stream(endpoint, "events", 4)

      {Convoy.Queue, stream: "events", kinesis: Convoy.Local.kinesis_options(endpoint)}
  """
  use GenServer

  @root Path.expand("../..", __DIR__)

  @doc """
  Starts the emulator and waits until it answers.

  ## Options

    * `:port` - the port on 127.0.0.1; `0` (the default) picks a free one.
    * `:enforce_limits` - enforce the per-shard write limits (1 MiB/s and
      1,000 records/s per shard), to exercise throttling. Default `false`.
    * `:iterator_ttl_seconds` - how long shard iterators live. Default `300`.
    * `:subscription_seconds` - how long an enhanced fan-out subscription
      (SubscribeToShard) lasts before the reader must renew it. Default
      `300`, as in AWS.
    * `:log_put_records` - record the size of every PutRecords request, for
      `put_requests/1`. Default `false`.
    * `:name` - a name to register the process under.

  ## Example

      {:ok, local} = Convoy.Local.start_link(port: 4567)
  """
  @spec start_link(keyword) :: GenServer.on_start()
  def start_link(options \\ []) do
    {name, options} = Keyword.pop(options, :name)
    GenServer.start_link(__MODULE__, options, if(name, do: [name: name], else: []))
  end

  @doc """
  Like `start_link/1`, without a link: the emulator outlives the caller until
  `stop/1`.

  ## Example

      {:ok, local} = Convoy.Local.start(enforce_limits: true)
  """
  @spec start(keyword) :: GenServer.on_start()
  def start(options \\ []) do
    {name, options} = Keyword.pop(options, :name)
    GenServer.start(__MODULE__, options, if(name, do: [name: name], else: []))
  end

  @doc """
  The emulator's endpoint URL, such as `"http://127.0.0.1:45123"`.

  ## Example

      "http://127.0.0.1:" <> _port = Convoy.Local.endpoint(local)
  """
  @spec endpoint(GenServer.server()) :: String.t()
  def endpoint(server), do: GenServer.call(server, :endpoint)

  @doc """
  The PutRecords requests a server started with `log_put_records: true`
  received, in order, as `{entries, bytes}` (bytes: data plus partition
  keys). For tests of how a producer cuts its requests.

  ## Example

      {:ok, local} = Convoy.Local.start(log_put_records: true)
      [{500, _}, {500, _}, {200, _}] = Convoy.Local.put_requests(local)
  """
  @spec put_requests(GenServer.server()) :: [{non_neg_integer, non_neg_integer}]
  def put_requests(server), do: GenServer.call(server, :put_requests)

  @doc """
  The SubscribeToShard requests the emulator answered, in order, as
  `{shard_id, :opened}` or `{shard_id, :in_use}` (refused with
  ResourceInUseException: the consumer subscribed to that shard less than
  5 seconds before and that subscription still lives). For tests of
  enhanced fan-out's renewals and races.

  ## Example

      [{"shardId-000000000000", :opened} | _] = Convoy.Local.subscriptions(local)
  """
  @spec subscriptions(GenServer.server()) :: [{String.t(), :opened | :in_use}]
  def subscriptions(server), do: GenServer.call(server, :subscriptions)

  @doc """
  Stops the emulator.

  ## Example

      :ok = Convoy.Local.stop(local)
  """
  @spec stop(GenServer.server()) :: :ok
  def stop(server), do: GenServer.stop(server)

  @doc """
  The `kinesis:` options that point a queue at `endpoint` with placeholder
  credentials (emulators accept any).

  ## Example

      {Convoy.Queue, stream: "events", kinesis: Convoy.Local.kinesis_options("http://127.0.0.1:4567")}
  """
  @spec kinesis_options(String.t()) :: keyword
  def kinesis_options(endpoint) do
    [
      endpoint_url: endpoint,
      region: "us-east-1",
      access_key_id: "local",
      secret_access_key: "local"
    ]
  end

  # Stream administration runs the `kinesis_raw` tool (the AWS SDK for Rust
  # used directly), so the NIF an application loads carries none of it.

  @doc """
  Creates a stream with `shards` shards on the Kinesis at `endpoint` (this
  emulator or any other local one) and waits until it is active. An existing
  stream is left as it is.

  ## Example

      :ok = Convoy.Local.create_stream("http://127.0.0.1:4567", "events", 4)
  """
  @spec create_stream(String.t(), String.t(), pos_integer) :: :ok | {:error, term}
  def create_stream(endpoint, stream, shards \\ 1) when is_integer(shards) and shards > 0 do
    with {:ok, _} <- admin(["create-stream", endpoint, stream, Integer.to_string(shards)]) do
      :ok
    end
  end

  @doc """
  Deletes a stream.

  ## Example

      :ok = Convoy.Local.delete_stream("http://127.0.0.1:4567", "events")
  """
  @spec delete_stream(String.t(), String.t()) :: :ok | {:error, term}
  def delete_stream(endpoint, stream) do
    with {:ok, _} <- admin(["delete-stream", endpoint, stream]), do: :ok
  end

  @doc """
  Lists a stream's shards (all pages), each a map with `:shard_id`,
  `:parent_shard_id`, `:adjacent_parent_shard_id`, `:starting_hash_key`,
  `:ending_hash_key` and `:ending_sequence_number` (`nil` while open).

  ## Example

      {:ok, [%{shard_id: "shardId-000000000000"} | _]} = Convoy.Local.list_shards(endpoint, "events")
  """
  @spec list_shards(String.t(), String.t()) :: {:ok, [map]} | {:error, term}
  def list_shards(endpoint, stream) do
    with {:ok, lines} <- admin(["list-shards", endpoint, stream]) do
      keys = [
        :shard_id,
        :parent_shard_id,
        :adjacent_parent_shard_id,
        :starting_hash_key,
        :ending_hash_key,
        :ending_sequence_number
      ]

      shards =
        for line <- lines do
          values = line |> String.split("\t") |> Enum.map(&if(&1 == "-", do: nil, else: &1))
          keys |> Enum.zip(values) |> Map.new()
        end

      {:ok, shards}
    end
  end

  @doc """
  Splits a shard at `new_starting_hash_key` (a decimal string) and waits for
  the stream to be active again.

  ## Example

      :ok = Convoy.Local.split_shard(endpoint, "events", "shardId-000000000000", "170141183460469231731687303715884105728")
  """
  @spec split_shard(String.t(), String.t(), String.t(), String.t()) :: :ok | {:error, term}
  def split_shard(endpoint, stream, shard_id, new_starting_hash_key) do
    with {:ok, _} <-
           admin(["split-shard", endpoint, stream, shard_id, new_starting_hash_key]),
         do: :ok
  end

  # Runs one kinesis_raw command; its output is one result per line, or
  # `error<TAB>code<TAB>message`.
  defp admin(args) do
    # stderr stays apart: only kinesis_raw's result lines are parsed.
    case System.cmd(tool!(), args) do
      {output, 0} ->
        {:ok, String.split(output, "\n", trim: true)}

      {output, _status} ->
        case Regex.run(~r/^error\t([^\t]*)\t(.*)$/m, output) do
          [_, code, message] -> {:error, {:aws, code, message}}
          nil -> {:error, {:kinesis_raw, String.trim(output)}}
        end
    end
  end

  @doc """
  The path of the `kinesis_raw` tool (the AWS SDK for Rust used directly),
  built with cargo when missing. It administers streams for this module and
  serves Convoy's own tests and benchmarks. `CONVOY_KINESIS_RAW_BIN`
  overrides it.

  ## Example

      path = Convoy.Local.tool!()
  """
  @spec tool!() :: Path.t()
  def tool!, do: built!("kinesis_raw", "CONVOY_KINESIS_RAW_BIN")

  @doc """
  The path of the `convoy_local` binary, built with cargo when missing.
  `CONVOY_LOCAL_BIN` overrides it.

  ## Example

      path = Convoy.Local.binary!()
  """
  @spec binary!() :: Path.t()
  def binary!, do: built!("convoy_local", "CONVOY_LOCAL_BIN")

  defp built!(name, override) do
    case System.get_env(override) do
      nil ->
        path = Path.join(@root, "target/release/" <> name)

        unless File.exists?(path) do
          args = [
            "build",
            "--release",
            "-p",
            name,
            "--manifest-path",
            Path.join(@root, "Cargo.toml")
          ]

          {_, 0} =
            System.cmd("cargo", args, into: IO.stream(:stdio, :line), stderr_to_stdout: true)
        end

        path

      path ->
        path
    end
  end

  # ---------------------------------------------------------------------------

  @impl true
  def init(options) do
    options =
      Keyword.validate!(options,
        port: 0,
        enforce_limits: false,
        iterator_ttl_seconds: 300,
        subscription_seconds: 300,
        log_put_records: false
      )

    Process.flag(:trap_exit, true)

    args =
      ["serve", "--port", Integer.to_string(options[:port])] ++
        if(options[:enforce_limits], do: ["--enforce-limits"], else: []) ++
        ["--iterator-ttl-seconds", Integer.to_string(options[:iterator_ttl_seconds])] ++
        ["--subscription-seconds", Integer.to_string(options[:subscription_seconds])] ++
        if(options[:log_put_records], do: ["--log-put-records"], else: [])

    port =
      Port.open({:spawn_executable, binary!()}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        line: 4096,
        args: args
      ])

    case await_listening(port, "") do
      {:ok, endpoint} ->
        :ok = await_answer(endpoint, 50)
        {:ok, %{port: port, endpoint: endpoint, put_requests: [], subscriptions: []}}

      {:error, reason} ->
        {:stop, reason}
    end
  end

  defp await_listening(port, seen) do
    receive do
      {^port, {:data, {:eol, "convoy_local listening on " <> endpoint}}} ->
        {:ok, endpoint}

      {^port, {:data, {_, line}}} ->
        await_listening(port, seen <> line <> "\n")

      {^port, {:exit_status, status}} ->
        {:error, {:convoy_local_exited, status, seen}}
    after
      30_000 -> {:error, {:convoy_local_timeout, seen}}
    end
  end

  # The server binds before it prints; still, check that it serves HTTP.
  defp await_answer(endpoint, tries) do
    %URI{host: host, port: port} = URI.parse(endpoint)

    with {:ok, socket} <-
           :gen_tcp.connect(String.to_charlist(host), port, [:binary, active: false], 1_000),
         :ok <-
           :gen_tcp.send(
             socket,
             "GET /_health/live HTTP/1.1\r\nhost: #{host}\r\nconnection: close\r\n\r\n"
           ),
         {:ok, "HTTP/1.1 200" <> _} <- :gen_tcp.recv(socket, 0, 2_000) do
      :gen_tcp.close(socket)
      :ok
    else
      _ when tries > 0 ->
        Process.sleep(100)
        await_answer(endpoint, tries - 1)

      other ->
        raise "convoy_local at #{endpoint} does not answer: #{inspect(other)}"
    end
  end

  @impl true
  def handle_call(:endpoint, _from, state), do: {:reply, state.endpoint, state}

  def handle_call(:put_requests, _from, state),
    do: {:reply, Enum.reverse(state.put_requests), state}

  def handle_call(:subscriptions, _from, state),
    do: {:reply, Enum.reverse(state.subscriptions), state}

  @impl true
  def handle_info({port, {:exit_status, status}}, %{port: port} = state) do
    {:stop, {:convoy_local_exited, status}, state}
  end

  def handle_info(
        {port, {:data, {:eol, "convoy_local put_records " <> counts}}},
        %{port: port} = state
      ) do
    [entries, bytes] = counts |> String.split() |> Enum.map(&String.to_integer/1)
    {:noreply, %{state | put_requests: [{entries, bytes} | state.put_requests]}}
  end

  def handle_info(
        {port, {:data, {:eol, "convoy_local subscribe " <> subscription}}},
        %{port: port} = state
      ) do
    [shard_id, outcome] = String.split(subscription)
    outcome = if outcome == "opened", do: :opened, else: :in_use
    {:noreply, %{state | subscriptions: [{shard_id, outcome} | state.subscriptions]}}
  end

  def handle_info({port, {:data, _}}, %{port: port} = state), do: {:noreply, state}
  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, %{port: port}) do
    # Closing stdin makes convoy_local shut down.
    if Port.info(port) do
      {:os_pid, os_pid} = Port.info(port, :os_pid)
      Port.close(port)
      await_exit(os_pid, 50)
    end

    :ok
  end

  defp await_exit(os_pid, 0),
    do: System.cmd("kill", ["-9", Integer.to_string(os_pid)], stderr_to_stdout: true)

  defp await_exit(os_pid, tries) do
    case System.cmd("kill", ["-0", Integer.to_string(os_pid)], stderr_to_stdout: true) do
      {_, 0} ->
        Process.sleep(50)
        await_exit(os_pid, tries - 1)

      _ ->
        :ok
    end
  end
end
