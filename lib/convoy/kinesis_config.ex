defmodule Convoy.KinesisConfig do
  @moduledoc """
  Kinesis connection settings.

  The same keys are accepted in two places; the queue's own `kinesis:` option
  wins over the application config, which wins over the AWS default chain
  (environment variables, shared profile, container or instance role):

      config :convoy, :kinesis,
        endpoint_url: "http://127.0.0.1:4567",   # omit for real AWS
        region: "us-east-1",
        access_key_id: "...",
        secret_access_key: "...",
        session_token: nil,
        profile: nil

      {Convoy.Queue, stream: "events", kinesis: [endpoint_url: "http://127.0.0.1:4567"]}

  Keys:

    * `:endpoint_url` - a Kinesis-compatible endpoint such as a local emulator
    * `:region` - the AWS region; `"us-east-1"` when an `endpoint_url` is set and no region is
    * `:access_key_id`, `:secret_access_key`, `:session_token` - static credentials
    * `:profile` - a profile from `~/.aws/config`
    * `:request_timeout` - ms allowed for one API call (default `10_000`)

  Secrets never show up in `inspect/1`, logs or error messages: this struct's
  `Inspect` implementation redacts them.

  ## Example

      iex> config = Convoy.KinesisConfig.resolve(secret_access_key: "s3cr3t", region: "eu-west-1")
      iex> config.region
      "eu-west-1"
      iex> inspect(config) =~ "s3cr3t"
      false
  """

  @keys [
    :endpoint_url,
    :region,
    :access_key_id,
    :secret_access_key,
    :session_token,
    :profile,
    :request_timeout
  ]
  @secrets [:access_key_id, :secret_access_key, :session_token]

  defstruct endpoint_url: nil,
            region: nil,
            access_key_id: nil,
            secret_access_key: nil,
            session_token: nil,
            profile: nil,
            request_timeout: 10_000

  @type t :: %__MODULE__{
          endpoint_url: String.t() | nil,
          region: String.t() | nil,
          access_key_id: String.t() | nil,
          secret_access_key: String.t() | nil,
          session_token: String.t() | nil,
          profile: String.t() | nil,
          request_timeout: pos_integer
        }

  @doc """
  Merges the queue's `kinesis:` options over `config :convoy, :kinesis` and
  validates the result. Raises `ArgumentError` naming a bad key or value.

  ## Example

      Convoy.KinesisConfig.resolve(endpoint_url: "http://127.0.0.1:4567")
  """
  @spec resolve(keyword) :: t
  def resolve(queue_options) do
    app = Application.get_env(:convoy, :kinesis, [])

    merged =
      Keyword.merge(
        check_keys!(app, "config :convoy, :kinesis"),
        check_keys!(queue_options, "kinesis:")
      )

    config = struct!(__MODULE__, merged)

    for key <- [
          :endpoint_url,
          :region,
          :access_key_id,
          :secret_access_key,
          :session_token,
          :profile
        ] do
      value = Map.fetch!(config, key)

      unless is_nil(value) or (is_binary(value) and value != "") do
        raise ArgumentError,
              "invalid kinesis option #{inspect(key)}: expected a non-empty string or nil" <>
                if(key in @secrets, do: "", else: ", got: #{inspect(value)}")
      end
    end

    unless is_integer(config.request_timeout) and config.request_timeout > 0 do
      raise ArgumentError,
            "invalid kinesis option :request_timeout: expected a positive integer (ms), got: " <>
              inspect(config.request_timeout)
    end

    if is_nil(config.access_key_id) != is_nil(config.secret_access_key) do
      raise ArgumentError,
            "kinesis options :access_key_id and :secret_access_key must be given together"
    end

    if config.endpoint_url && is_nil(config.region) do
      %{config | region: "us-east-1"}
    else
      config
    end
  end

  defp check_keys!(options, where) do
    unless Keyword.keyword?(options) do
      raise ArgumentError, "#{where} must be a keyword list, got: #{inspect(options)}"
    end

    case Keyword.keys(options) -- @keys do
      [] ->
        options

      unknown ->
        raise ArgumentError,
              "unknown #{where} keys #{inspect(unknown)}; known keys: #{inspect(@keys)}"
    end
  end

  @doc false
  # The map the NIF decodes.
  @spec to_native(t) :: map
  def to_native(%__MODULE__{} = config) do
    config
    |> Map.from_struct()
    |> Map.delete(:request_timeout)
    |> Map.put(:request_timeout_ms, config.request_timeout)
  end

  defimpl Inspect do
    import Inspect.Algebra

    def inspect(config, opts) do
      shown =
        config
        |> Map.from_struct()
        |> Enum.map(fn
          {key, value}
          when key in [:access_key_id, :secret_access_key, :session_token] and not is_nil(value) ->
            {key, :redacted}

          pair ->
            pair
        end)

      concat(["#Convoy.KinesisConfig<", to_doc(shown, opts), ">"])
    end
  end
end
