defmodule Convoy.Services.Kinesis do
  @moduledoc """
  The Kinesis Data Streams service behind `Convoy.Queue` (the default
  `:service`).

  Producing runs in the Rust NIF: `put/4` validates the record and hands it to
  the queue's batcher without a process hop. Consuming runs there too: one
  poller task per shard reads GetRecords and hands each batch to that shard's
  dispatcher process (`Convoy.Consumer.ShardDispatcher`), which takes it
  (the records are built on its heap), calls the handlers and acknowledges
  the batch before the next one is read.

  This supervisor builds the queue's Kinesis client and holds its two halves:
  `Convoy.Services.Kinesis.Producer`, which owns the native producer and
  registers the queue's handle, and the `Convoy.Consumer` tree. See
  `Convoy.Queue` for the API and options, and the README's "Architecture"
  for the whole tree.

  ## Example

      {:ok, _} = Convoy.Queue.start_link(stream: "events", service: Convoy.Services.Kinesis)
  """
  @behaviour Convoy.Service
  use Supervisor

  alias Convoy.{KinesisConfig, Native}
  alias Convoy.Services.Kinesis.{Producer, Source}

  @typedoc "The handle registered for the queue."
  @type t :: %{producer: reference, consumer: GenServer.server()}

  # ---------------------------------------------------------------------------
  # Convoy.Service

  @impl Convoy.Service
  def child_spec(options) do
    %{
      id: __MODULE__,
      start: {__MODULE__, :start_link, [options]},
      type: :supervisor,
      shutdown: :infinity
    }
  end

  @doc """
  Starts the service's tree for one queue, as a child of the queue's
  supervisor (which starts the reporter it needs first); start queues with
  `Convoy.Queue.start_link/1`.

  ## Example

      {:ok, _queue} = Convoy.Queue.start_link(stream: "events")
  """
  @spec start_link(keyword) :: Supervisor.on_start()
  def start_link(options), do: Supervisor.start_link(__MODULE__, options)

  @impl Convoy.Service
  def put(%{producer: producer}, key, data, []) do
    native_put(producer, key, data, nil, nil)
  end

  def put(%{producer: producer}, key, data, opts) do
    with {:ok, hash_key, await} <- Convoy.Queue.PutOptions.parse(opts) do
      case await do
        nil ->
          native_put(producer, key, data, hash_key, nil)

        timeout ->
          ref = make_ref()

          with :ok <- native_put(producer, key, data, hash_key, {self(), ref}) do
            receive do
              {^ref, result} -> result
            after
              timeout -> {:error, :timeout}
            end
          end
      end
    end
  end

  defp native_put(producer, key, data, hash_key, reply) when is_binary(data),
    do: Native.producer_put(producer, key, data, hash_key, reply)

  defp native_put(producer, key, data, hash_key, reply),
    do: Native.producer_put_term(producer, key, data, hash_key, reply)

  @impl Convoy.Service
  def flush(%{producer: producer}, opts) do
    case flush_timeout(opts) do
      {:ok, nil} ->
        Native.producer_flush(producer, nil)

      {:ok, timeout} ->
        ref = make_ref()
        :ok = Native.producer_flush(producer, {self(), ref})

        receive do
          {^ref, :ok} -> :ok
        after
          timeout -> {:error, :timeout}
        end

      {:error, _} = error ->
        error
    end
  end

  defp flush_timeout(opts) do
    with true <- is_list(opts) and Keyword.keyword?(opts),
         {known, []} <- Keyword.split(opts, [:await]),
         await when is_nil(await) or await == :infinity or (is_integer(await) and await >= 0) <-
           known[:await] do
      {:ok, await}
    else
      false -> {:error, {:invalid_options, opts}}
      {_, unknown} -> {:error, {:unknown_options, Keyword.keys(unknown)}}
      await -> {:error, {:invalid_await, await}}
    end
  end

  @impl Convoy.Service
  def get(%{consumer: consumer}, limit), do: Convoy.Consumer.get(consumer, limit)

  @impl Convoy.Service
  def attach_handler(%{consumer: consumer}, id, handler, config, opts),
    do: Convoy.Consumer.attach(consumer, id, handler, config, opts)

  @impl Convoy.Service
  def detach_handler(%{consumer: consumer}, id), do: Convoy.Consumer.detach(consumer, id)

  @impl Convoy.Service
  def stats(%{producer: producer}), do: Native.producer_stats(producer)

  @doc """
  Deregisters the enhanced fan-out consumer `name` of `stream` (see the
  queue option `:consumer`). Kinesis bills a registered consumer by the
  hour whether anything reads through it or not, and Convoy never
  deregisters one by itself: a queue that stops may start again. Call it
  once no queue reads through the consumer: a running queue registers it
  again at its next subscription.

  `kinesis` takes the connection settings of the queue option `:kinesis`.
  An unknown consumer is not an error.

  ## Example

      :ok = Convoy.Services.Kinesis.deregister_consumer("events", "billing")
  """
  @spec deregister_consumer(String.t(), String.t(), keyword) :: :ok | {:error, term}
  def deregister_consumer(stream, name, kinesis \\ [])
      when is_binary(stream) and is_binary(name) and is_list(kinesis) do
    config = KinesisConfig.to_native(KinesisConfig.resolve(kinesis))

    with {:ok, client} <- Native.call(&Native.client_new(config, &1)),
         {:ok, :ok} <- Native.call(&Native.fan_out_deregister(client, stream, name, &1)) do
      :ok
    end
  end

  # ---------------------------------------------------------------------------
  # The service's tree

  @impl Supervisor
  def init(options) do
    # The Kinesis client is built once here and shared by the producer and
    # the consumer; it lives as long as this supervisor's child specs.
    case Native.call(&Native.client_new(KinesisConfig.to_native(options[:kinesis]), &1)) do
      {:ok, client} ->
        fan_out =
          case options[:consumer] do
            {:fan_out, name} -> Native.fan_out_consumer(client, options[:stream], name)
            :polling -> nil
          end

        source =
          {Source,
           %{
             client: client,
             stream: options[:stream],
             stream_id: options[:stream_id],
             fan_out: fan_out
           }}

        children = [
          {Producer, {options, client}},
          {Convoy.Consumer, Convoy.Consumer.queue_options(options) ++ [source: source]}
        ]

        Supervisor.init(children, strategy: :one_for_one)

      {:error, reason} ->
        exit({:kinesis_client, reason})
    end
  end
end
