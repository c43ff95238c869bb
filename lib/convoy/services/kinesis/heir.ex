defmodule Convoy.Services.Kinesis.Heir do
  @moduledoc false
  # Inherits the failure reports of producers whose queue process died
  # without closing them (killed, or brutally shut down by its supervisor).
  #
  # A producer monitors its queue. When the queue dies, the producer closes
  # itself, sends what it holds and reports what finally fails here, tagged
  # with the id the queue registered: this process logs it, emits telemetry
  # and calls the queue's `on_failure`, as the queue would have. Reports the
  # killed queue had already received but not handled die with it.
  #
  # Queues register in a public table, not through a call, so a slow
  # `on_failure` here never holds up a queue's start. One runs per application.

  use GenServer

  @table __MODULE__

  @doc "Registers a queue's reporting details; returns the heir and the id to tag reports with."
  @spec register(term, (map -> any) | pid | atom | nil) :: {pid, pos_integer}
  def register(stream_id, on_failure) do
    id = System.unique_integer([:positive])
    true = :ets.insert(@table, {id, stream_id, on_failure})
    {Process.whereis(__MODULE__), id}
  end

  @doc "Whether a queue of this stream_id is registered (for tests)."
  @spec holds?(term) :: boolean
  def holds?(stream_id), do: :ets.match(@table, {:_, stream_id, :_}) != []

  def start_link(_), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @impl true
  def init(nil) do
    :ets.new(@table, [:set, :public, :named_table, write_concurrency: true])
    {:ok, nil}
  end

  @impl true
  def handle_info({:convoy_orphan_put_failed, id, failures}, state) do
    {stream_id, on_failure} =
      case :ets.lookup(@table, id) do
        [{^id, stream_id, on_failure}] -> {stream_id, on_failure}
        [] -> {:unknown, nil}
      end

    Convoy.Services.Kinesis.report_failures(failures, stream_id, on_failure)
    {:noreply, state}
  end

  # The producer has ended and its owner is gone (stopped or killed).
  def handle_info({:convoy_closed, id}, state) do
    :ets.delete(@table, id)
    {:noreply, state}
  end

  def handle_info(_other, state), do: {:noreply, state}
end
