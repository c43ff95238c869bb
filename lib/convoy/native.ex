defmodule Convoy.Native do
  @moduledoc false
  # NIF stubs. The library is loaded when this module loads; if that fails,
  # every stub raises an error that says why instead of `:undef`.

  @on_load :load_nif

  def load_nif do
    path = :filename.join(:code.priv_dir(:convoy), ~c"native/convoy_nif")

    case :erlang.load_nif(path, 0) do
      :ok ->
        :ok

      {:error, {:reload, _}} ->
        :ok

      {:error, reason} ->
        :persistent_term.put({__MODULE__, :load_error}, reason)
        # Keep the module loaded so callers get a clear error from the stubs.
        :ok
    end
  end

  @doc false
  def loaded?, do: :persistent_term.get({__MODULE__, :load_error}, nil) == nil

  defp not_loaded do
    reason = :persistent_term.get({__MODULE__, :load_error}, :unknown)

    raise RuntimeError,
          "Convoy's native library (priv/native/convoy_nif.so) is not loaded: " <>
            "#{inspect(reason)}. Run `mix compile` with Rust (cargo) installed."
  end

  # Asynchronous NIFs take `reply_to = {pid, ref}` and answer `{ref, result}`.

  # client
  def client_new(_config, _reply_to), do: not_loaded()

  # producer
  def producer_start(_client, _options, _reporter), do: not_loaded()
  def producer_put(_producer, _key, _data, _explicit_hash_key, _reply_to), do: not_loaded()
  def producer_put_term(_producer, _key, _data, _explicit_hash_key, _reply_to), do: not_loaded()
  def producer_flush(_producer, _reply_to), do: not_loaded()
  def producer_close(_producer, _timeout_ms, _reply_to), do: not_loaded()
  def producer_stats(_producer), do: not_loaded()
  def producer_set_reporter(_producer, _reporter), do: not_loaded()
  def producer_await_lanes(_producer, _timeout_ms, _reply_to), do: not_loaded()

  # consumer: shard readers (a poller, or a fan-out subscription) answer to
  # the same acknowledgement and stop
  def poller_start(_client, _stream_id, _options, _position, _dispatcher), do: not_loaded()
  def reader_ack(_reader), do: not_loaded()
  def reader_take(_reader), do: not_loaded()
  def reader_take_dirty(_reader), do: not_loaded()
  def reader_stop(_reader), do: not_loaded()

  def fetch_records(
        _client,
        _stream,
        _stream_id,
        _shard_id,
        _position,
        _iterator,
        _limit,
        _telemetry,
        _reply_to
      ),
      do: not_loaded()

  def list_shards_nif(_client, _stream, _reply_to), do: not_loaded()

  # shard leases (KCL lease table in DynamoDB)
  def lease_client_new(_config, _table, _worker_id, _reply_to), do: not_loaded()
  def lease_prepare(_client, _reply_to), do: not_loaded()
  def lease_list(_client, _reply_to), do: not_loaded()
  def lease_create(_client, _lease, _reply_to), do: not_loaded()
  def lease_take(_client, _key, _counter, _owner, _reply_to), do: not_loaded()
  def lease_renew_all(_client, _reply_to), do: not_loaded()
  def lease_checkpoint(_client, _key, _checkpoint, _sub, _reply_to), do: not_loaded()
  def lease_release(_client, _key, _reply_to), do: not_loaded()
  def lease_forget(_client, _key), do: not_loaded()
  def lease_delete(_client, _key, _reply_to), do: not_loaded()
  def lease_calls(_client), do: not_loaded()
  def lease_held(_client), do: not_loaded()

  # enhanced fan-out
  def fan_out_consumer(_client, _stream, _name), do: not_loaded()
  def fan_out_deregister(_client, _stream, _name, _reply_to), do: not_loaded()

  def subscription_start(_consumer, _stream_id, _options, _position, _dispatcher),
    do: not_loaded()

  # JSON as the producer encodes it
  def encode_json(_term), do: not_loaded()
  # a record checked and encoded as put/3 does for every service
  def put_record_check(_key, _data, _explicit_hash_key, _max_record_bytes), do: not_loaded()

  # fault injection for Convoy's own tests (cargo feature test-hooks)
  def debug_nif_panic, do: test_hook()
  def debug_task_panic(_pid), do: test_hook()
  def debug_echo_from_task(_pid, _payload), do: test_hook()
  def debug_lane_panic(_producer, _mid_cut), do: test_hook()

  defp test_hook do
    if loaded?() do
      raise RuntimeError,
            "this Convoy NIF is a test hook, built only for Convoy's own test env"
    else
      not_loaded()
    end
  end

  @doc false
  # Runs an asynchronous NIF, giving it `{self(), ref}`, and waits for its
  # `{ref, result}`. The fresh reference lets the VM skip the messages that
  # were in the mailbox before the call. A late reply after a timeout stays
  # in the mailbox, like a late GenServer reply.
  def call(fun, timeout \\ 30_000) do
    ref = make_ref()
    :ok = fun.({self(), ref})

    receive do
      {^ref, result} -> result
    after
      timeout -> {:error, :timeout}
    end
  end
end
