defmodule Convoy.Queue.HandleCache do
  @moduledoc false
  # The handle `put/4` found in the Registry, kept in the calling process's
  # dictionary so the next put skips the lookup (three ETS reads and a copy
  # of the handle, most of a put's cost).
  #
  # A cached handle is used only while all of these hold, so it never
  # outlives its Registry entry:
  #
  #   * its owner (the process that registered it) is alive: the Registry
  #     drops an entry when its owner dies, without any call;
  #   * no queue registered or unregistered a handle since it was looked up:
  #     `register/3` and `unregister/1` bump a generation counter, and a
  #     handle cached under an older generation is looked up again;
  #   * the service does not answer `{:error, :closed}`: then the handle is
  #     forgotten and the put is retried through the Registry once (a closed
  #     producer has accepted nothing, so the retry duplicates nothing).
  #
  # The counter is an `:atomics` created with the Registry (application
  # start); the queue itself is always found through the Registry.

  @counter {__MODULE__, :generation}

  @doc false
  @spec init() :: :ok
  def init do
    case :persistent_term.get(@counter, nil) do
      nil -> :persistent_term.put(@counter, :atomics.new(1, signed: false))
      _ -> :ok
    end
  end

  @doc false
  @spec generation() :: non_neg_integer
  def generation, do: :atomics.get(:persistent_term.get(@counter), 1)

  @doc false
  @spec bump() :: :ok
  def bump, do: :atomics.add(:persistent_term.get(@counter), 1, 1)

  @doc false
  @spec fetch(term) :: {:ok, (term, String.t(), term, keyword -> term), term} | :miss
  def fetch(stream_id) do
    case Process.get({__MODULE__, stream_id}) do
      # The counter itself is kept too: one term lookup less per put.
      {counter, generation, owner, put, handle} ->
        if :atomics.get(counter, 1) == generation and Process.alive?(owner),
          do: {:ok, put, handle},
          else: :miss

      nil ->
        :miss
    end
  end

  # The service's `put/4` is kept as a function (`&service.put/4`), not as a
  # module: calling a remote function through a module held in a variable
  # looks the function up in the export table on every call (about 20 ns),
  # calling the captured function does not.
  @doc false
  @spec store(term, non_neg_integer, pid, module, term) :: :ok
  def store(stream_id, generation, owner, service, handle) do
    counter = :persistent_term.get(@counter)
    put = Function.capture(service, :put, 4)
    Process.put({__MODULE__, stream_id}, {counter, generation, owner, put, handle})
    :ok
  end

  @doc false
  @spec forget(term) :: :ok
  def forget(stream_id) do
    Process.delete({__MODULE__, stream_id})
    :ok
  end
end
