defmodule Convoy.Services.Kinesis.Heir do
  @moduledoc false
  # Inherits the failure reports of producers whose queue process died
  # without closing them (killed, or brutally shut down by its supervisor).
  #
  # A producer monitors its queue. When the queue dies, the producer closes
  # itself, sends what it holds and reports what finally fails here, tagged
  # with the id the queue registered: this process logs it, emits telemetry
  # and calls the queue's `on_failure`, as the queue would have. Nothing a
  # killed queue had accepted goes unreported. One runs per application.

  use GenServer

  @doc "Registers a queue's reporting details; returns the heir and the id to tag reports with."
  @spec register(term, (map -> any) | nil) :: {pid, pos_integer}
  def register(stream_id, on_failure) do
    id = System.unique_integer([:positive])
    :ok = GenServer.call(__MODULE__, {:register, id, stream_id, on_failure})
    {Process.whereis(__MODULE__), id}
  end

  def start_link(_), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @impl true
  def init(nil), do: {:ok, %{}}

  @impl true
  def handle_call({:register, id, stream_id, on_failure}, _from, queues) do
    {:reply, :ok, Map.put(queues, id, {stream_id, on_failure})}
  end

  @impl true
  def handle_info({:convoy_orphan_put_failed, id, failures}, queues) do
    {stream_id, on_failure} = Map.get(queues, id, {:unknown, nil})
    Convoy.Services.Kinesis.report_failures(failures, stream_id, on_failure)
    {:noreply, queues}
  end

  # The producer is closed: after a normal stop, or once a killed queue's
  # producer has sent or failed everything.
  def handle_info({:convoy_closed, id}, queues), do: {:noreply, Map.delete(queues, id)}

  def handle_info(_other, queues), do: {:noreply, queues}
end
