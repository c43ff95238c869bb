defmodule Convoy.TestSupport.LeaseNode do
  @moduledoc false
  # A Convoy node in its own OS process (test/leases/node.exs run by
  # `elixir`), for the multi-node lease tests. This process owns the Port
  # and keeps what the node reported: every record its handler saw (in
  # order), and the shards it last said it held.

  use GenServer

  @root Path.expand("../..", __DIR__)

  def start(name, queue_options, node_options \\ []) do
    GenServer.start(__MODULE__, {name, {queue_options, node_options}})
  end

  @doc "Records handled so far, in arrival order: %{at: os time in µs, shard_id, sequence_number, data}."
  def records(node), do: GenServer.call(node, :records)
  def held(node), do: GenServer.call(node, :held)

  @doc "shard_id => the checkpoint the node last reported for it while holding it."
  def checkpoints(node), do: GenServer.call(node, :checkpoints)
  def name(node), do: GenServer.call(node, :name)
  def alive?(node), do: GenServer.call(node, :alive?)
  def ready?(node), do: GenServer.call(node, :ready?)
  def output(node), do: GenServer.call(node, :output)

  @doc "The node's `Convoy.Leases.Coordinator.info/1`."
  def info(node), do: GenServer.call(node, :info, 30_000)

  @doc "Graceful stop: the queue stops (handing its leases over), then the VM."
  def stop(node, timeout \\ 90_000) do
    GenServer.call(node, :stop)
    wait_exit(node, timeout)
  end

  @doc "SIGKILL: the node's VM dies on the spot."
  def kill(node) do
    os_pid = GenServer.call(node, :os_pid)
    {_, 0} = System.cmd("kill", ["-9", "#{os_pid}"])
    wait_exit(node, 30_000)
  end

  defp wait_exit(node, timeout) do
    deadline = System.monotonic_time(:millisecond) + timeout
    do_wait_exit(node, deadline)
  end

  defp do_wait_exit(node, deadline) do
    cond do
      not alive?(node) ->
        :ok

      System.monotonic_time(:millisecond) > deadline ->
        {:error, :timeout}

      true ->
        Process.sleep(50)
        do_wait_exit(node, deadline)
    end
  end

  @impl true
  def init({name, options}) do
    ebin = Path.join(@root, "_build/test/lib/convoy/ebin")
    script = Path.join(@root, "test/leases/node.exs")
    encoded = options |> :erlang.term_to_binary() |> Base.encode64()

    port =
      Port.open({:spawn_executable, System.find_executable("elixir")}, [
        :binary,
        :exit_status,
        {:line, 65_536},
        :stderr_to_stdout,
        args: ["-pa", ebin, script, encoded],
        env: [{~c"CONVOY_RUNTIME_THREADS", ~c"1"}]
      ])

    {:os_pid, os_pid} = Port.info(port, :os_pid)

    {:ok,
     %{
       name: name,
       port: port,
       os_pid: os_pid,
       records: [],
       held: [],
       checkpoints: %{},
       ready: false,
       alive: true,
       output: [],
       partial: "",
       info_waiters: []
     }}
  end

  @impl true
  def handle_call(:records, _from, state), do: {:reply, Enum.reverse(state.records), state}
  def handle_call(:held, _from, state), do: {:reply, state.held, state}
  def handle_call(:checkpoints, _from, state), do: {:reply, state.checkpoints, state}
  def handle_call(:name, _from, state), do: {:reply, state.name, state}
  def handle_call(:alive?, _from, state), do: {:reply, state.alive, state}
  def handle_call(:ready?, _from, state), do: {:reply, state.ready, state}
  def handle_call(:os_pid, _from, state), do: {:reply, state.os_pid, state}
  def handle_call(:output, _from, state), do: {:reply, Enum.reverse(state.output), state}

  def handle_call(:info, from, state) do
    Port.command(state.port, "info\n")
    {:noreply, %{state | info_waiters: state.info_waiters ++ [from]}}
  end

  def handle_call(:stop, _from, state) do
    if state.alive, do: Port.command(state.port, "stop\n")
    {:reply, :ok, state}
  end

  @impl true
  def handle_info({port, {:data, {:noeol, part}}}, %{port: port} = state) do
    {:noreply, %{state | partial: state.partial <> part}}
  end

  def handle_info({port, {:data, {:eol, line}}}, %{port: port} = state) do
    {:noreply, line(%{state | partial: ""}, state.partial <> line)}
  end

  def handle_info({port, {:exit_status, _status}}, %{port: port} = state) do
    {:noreply, %{state | alive: false, held: []}}
  end

  def handle_info(_other, state), do: {:noreply, state}

  defp line(state, "REC " <> rest) do
    [at, shard, seq, data] = String.split(rest, " ", parts: 4)
    record = %{at: String.to_integer(at), shard_id: shard, sequence_number: seq, data: data}
    %{state | records: [record | state.records]}
  end

  defp line(state, "HELD " <> rest), do: %{state | held: String.split(rest, ",", trim: true)}
  defp line(state, "HELD"), do: %{state | held: []}

  defp line(state, "CKPT " <> rest) do
    [shard, checkpoint] = String.split(rest, " ", parts: 2)
    %{state | checkpoints: Map.put(state.checkpoints, shard, checkpoint)}
  end

  defp line(state, "READY"), do: %{state | ready: true}

  defp line(%{info_waiters: [from | rest]} = state, "INFO " <> info) do
    {value, _} = Code.eval_string(info)
    GenServer.reply(from, value)
    %{state | info_waiters: rest}
  end

  defp line(state, other) do
    # Logs and anything unexpected, kept (bounded) for failure messages.
    %{state | output: Enum.take([other | state.output], 200)}
  end
end
