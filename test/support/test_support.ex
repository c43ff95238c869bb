defmodule Convoy.TestSupport do
  @moduledoc false
  # Helpers shared by the tests: the emulator, unique streams, raw reads.

  import ExUnit.Assertions

  def start_emulator! do
    case System.get_env("CONVOY_KINESIS_ENDPOINT") do
      endpoint when is_binary(endpoint) and endpoint != "" ->
        :persistent_term.put({__MODULE__, :endpoint}, endpoint)
        :persistent_term.put({__MODULE__, :embedded}, false)
        endpoint

      _ ->
        # Not linked to the test process: it lives for the whole run.
        {:ok, pid} = Convoy.Local.start(port: 0, enforce_limits: false, iterator_ttl_seconds: 300)
        endpoint = Convoy.Local.endpoint(pid)
        :persistent_term.put({__MODULE__, :endpoint}, endpoint)
        :persistent_term.put({__MODULE__, :embedded}, true)
        endpoint
    end
  end

  # Tests tagged :embedded_only start an embedded emulator of their own, to
  # stop and restart it or to shorten its iterator lifetime; no other
  # emulator offers those controls, so a run against one would only repeat
  # them. They run once, in the embedded run.
  # Tests tagged `unsupported_by: :name` need what that emulator gets wrong
  # (script/test names the emulator in CONVOY_KINESIS_EMULATOR).
  def excluded_tags do
    embedded = if embedded?(), do: [], else: [:embedded_only]
    # kinesalite has no SubscribeToShard (enhanced fan-out). kinesis-mock
    # has it, but keeps a subscription to a split shard open without naming
    # the children, and counts a subscription the client closed as active
    # until its five minutes are over.
    case System.get_env("CONVOY_KINESIS_EMULATOR") do
      "kinesalite" ->
        [:fan_out, {:unsupported_by, :kinesalite} | embedded]

      "kinesis-mock" ->
        [:fan_out_lifecycle, {:unsupported_by, :"kinesis-mock"} | embedded]

      name when is_binary(name) and name != "" ->
        [{:unsupported_by, String.to_atom(name)} | embedded]

      _ ->
        embedded
    end
  end

  # How many records a volume test uses: the full count by default, scaled by
  # CONVOY_TEST_VOLUME (a fraction) against slower emulators. kinesis-mock,
  # for one, holds each shard to the real 1,000 records/s write limit.
  def volume(count) do
    scale =
      case Float.parse(System.get_env("CONVOY_TEST_VOLUME", "1")) do
        {scale, ""} when scale > 0 -> scale
        _ -> raise ArgumentError, "CONVOY_TEST_VOLUME must be a positive number"
      end

    max(1, round(count * scale))
  end

  def endpoint, do: :persistent_term.get({__MODULE__, :endpoint})
  def embedded?, do: :persistent_term.get({__MODULE__, :embedded})

  def kinesis(endpoint \\ endpoint()), do: Convoy.Local.kinesis_options(endpoint)

  def unique_stream(prefix \\ "test") do
    "#{prefix}-#{System.unique_integer([:positive])}"
  end

  def create_stream!(stream, shards, endpoint \\ endpoint()) do
    assert :ok = Convoy.Local.create_stream(endpoint, stream, shards)
    stream
  end

  @doc "Reads every record of every shard from the start, through the SDK, bypassing Convoy.Queue."
  def read_all(stream, endpoint \\ endpoint()) do
    config = Convoy.KinesisConfig.resolve(kinesis(endpoint))

    {:ok, client} =
      Convoy.Native.call(&Convoy.Native.client_new(Convoy.KinesisConfig.to_native(config), &1))

    {:ok, shards} = Convoy.Local.list_shards(endpoint, stream)

    Enum.flat_map(shards, fn %{shard_id: shard_id} ->
      read_shard(client, stream, shard_id, :trim_horizon, [])
    end)
  end

  defp read_shard(client, stream, shard_id, position, acc) do
    {:ok, {records, _next, _behind, _unparseable}} =
      Convoy.Native.call(
        &Convoy.Native.fetch_records(
          client,
          stream,
          stream,
          shard_id,
          position,
          nil,
          10_000,
          false,
          &1
        )
      )

    case List.last(records) do
      nil ->
        Enum.reverse(acc) |> List.flatten()

      last ->
        read_shard(client, stream, shard_id, {:after_sequence_number, last.sequence_number}, [
          records | acc
        ])
    end
  end

  @root Path.expand("../..", __DIR__)

  @doc "The kinesis_raw binary: the AWS SDK used directly, independent of Convoy."
  def raw_bin!, do: Convoy.Local.tool!()

  @doc """
  Writes `count` records with kinesis_raw, one request at a time so each
  shard receives them in order: record `i` has key `key-{i % keys}` and data `record-{i}`.
  """
  def raw_put!(stream, count, opts \\ []) do
    endpoint = Keyword.get(opts, :endpoint, endpoint())
    start = Keyword.get(opts, :start, 0)
    keys = Keyword.get(opts, :keys, 16)
    args = ["put", endpoint, stream, "#{count}", "0", "1", "#{start}", "#{keys}"]
    {out, status} = System.cmd(raw_bin!(), args, stderr_to_stdout: true)
    assert status == 0, out
    :ok
  end

  @doc "Puts a record, waiting out `:overloaded` answers (the buffer's bound at work)."
  def put_until_accepted(stream_id, key, data) do
    case Convoy.Queue.put(stream_id, key, data) do
      :ok ->
        :ok

      {:error, :overloaded} ->
        Process.sleep(2)
        put_until_accepted(stream_id, key, data)
    end
  end

  @doc """
  For a pid handler (the test process): acknowledges its batches until
  `count` records came, except the last batch, which it returns unacknowledged
  with every record received, as `{batch, records}`. Holding it keeps its
  shard from being read to its end.
  """
  def hold_last(count, timeout, acc \\ []) do
    receive do
      {:convoy_batch, batch} ->
        acc = acc ++ batch.records

        if length(acc) >= count do
          {batch, acc}
        else
          :ok = Convoy.Queue.ack(batch)
          hold_last(count, timeout, acc)
        end
    after
      timeout -> ExUnit.Assertions.flunk("got #{length(acc)} records of #{count}")
    end
  end

  @doc """
  Receives `count` `{:record, record}` messages, in arrival order; flunks
  when one does not come within `timeout` ms.
  """
  def receive_records(count, timeout, acc \\ []) do
    if count == 0 do
      Enum.reverse(acc)
    else
      receive do
        {:record, record} -> receive_records(count - 1, timeout, [record | acc])
      after
        timeout -> ExUnit.Assertions.flunk("got #{length(acc)} records, #{count} missing")
      end
    end
  end

  @doc "The shard dispatcher of a one-shard queue, once it has started."
  def only_dispatcher(stream_id) do
    [dispatcher] =
      eventually(fn ->
        sup = Convoy.Consumer.Supervisor.dispatchers(stream_id)
        children = DynamicSupervisor.which_children(sup)
        match?([_], children) && for {_, pid, _, _} <- children, do: pid
      end)

    dispatcher
  end

  @doc "Waits until `fun` returns a truthy value, checking every 50 ms."
  def eventually(fun, timeout \\ 60_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    do_eventually(fun, deadline)
  end

  defp do_eventually(fun, deadline) do
    case fun.() do
      result when result not in [nil, false] ->
        result

      _ ->
        if System.monotonic_time(:millisecond) > deadline do
          flunk("condition not met in time")
        else
          Process.sleep(50)
          do_eventually(fun, deadline)
        end
    end
  end

  @doc "Every record as Kinesis stores it (aggregated ones not unpacked), read by kinesis_raw."
  def raw_get!(stream, endpoint \\ endpoint()) do
    {out, 0} = System.cmd(raw_bin!(), ["dump", endpoint, stream])

    out
    |> String.split("\n", trim: true)
    |> Enum.map(fn line ->
      [shard, seq, key, data] = String.split(line, "\t")

      %{
        shard_id: shard,
        sequence_number: seq,
        partition_key: Base.decode16!(key, case: :lower),
        data: Base.decode16!(data, case: :lower)
      }
    end)
  end

  @doc "A project-local virtual environment with awslabs' aws-kinesis-agg; returns its python."
  def interop_python! do
    venv = Path.join(@root, "_build/interop-venv")
    python = Path.join(venv, "bin/python")

    unless File.exists?(Path.join(venv, ".ready")) do
      {out, status} = System.cmd("python3", ["-m", "venv", venv], stderr_to_stdout: true)
      assert status == 0, out
      pip = Path.join(venv, "bin/pip")

      {out, status} =
        System.cmd(pip, ["install", "-q", "aws-kinesis-agg==1.2.3", "six"], stderr_to_stdout: true)

      assert status == 0, out
      File.write!(Path.join(venv, ".ready"), "")
    end

    python
  end

  @doc "Runs test/interop/kpl_interop.py in `mode` with `input` on stdin."
  def interop!(mode, input) do
    script = Path.join(@root, "test/interop/kpl_interop.py")

    input_file =
      Path.join(System.tmp_dir!(), "convoy-interop-#{System.unique_integer([:positive])}")

    File.write!(input_file, input)

    try do
      {out, status} =
        System.cmd("sh", [
          "-c",
          ~s("$0" "$1" "$2" < "$3"),
          interop_python!(),
          script,
          mode,
          input_file
        ])

      assert status == 0, out
      String.split(out, "\n", trim: true)
    after
      File.rm(input_file)
    end
  end
end
