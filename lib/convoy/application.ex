defmodule Convoy.Application do
  @moduledoc false
  use Application

  @impl true
  def start(_type, _args) do
    :ok = Convoy.Queue.HandleCache.init()
    Convoy.Telemetry.setup()

    children = [
      {Registry, keys: :unique, name: Convoy.Registry},
      Convoy.Checkpoint.Memory,
      Convoy.Leases
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: Convoy.Supervisor)
  end
end
