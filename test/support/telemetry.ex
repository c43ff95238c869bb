defmodule :telemetry do
  @moduledoc false
  # A stand-in for the :telemetry library, which cannot be fetched here (no
  # Hex): Convoy's tests compile it so that Convoy finds `:telemetry` loaded.
  # `execute/3` sends `{:telemetry_event, event, measurements, metadata}` to
  # every process that called `Convoy.TestTelemetry.subscribe/0`.

  def execute(event, measurements, metadata) do
    if Process.whereis(Convoy.TestTelemetry) do
      Registry.dispatch(Convoy.TestTelemetry, :subscribers, fn entries ->
        for {pid, _} <- entries, do: send(pid, {:telemetry_event, event, measurements, metadata})
      end)
    end

    :ok
  end
end

defmodule Convoy.TestTelemetry do
  @moduledoc false
  # Subscriptions to the stand-in `:telemetry` above; an entry goes with its
  # process.

  def start do
    case Registry.start_link(keys: :duplicate, name: __MODULE__) do
      {:ok, pid} ->
        Process.unlink(pid)
        :ok

      {:error, {:already_started, _}} ->
        :ok
    end
  end

  def subscribe do
    {:ok, _} = Registry.register(__MODULE__, :subscribers, nil)
    :ok
  end
end
