using System.ClientModel;
using System.Runtime.CompilerServices;
using Microsoft.Extensions.AI;
using OpenAI;
using OpenAI.Chat;
using ChatMessage = Microsoft.Extensions.AI.ChatMessage;

namespace LocalVllm;

/// <summary>
/// The provider's remote mode: the same <see cref="IChatClient"/> contract over an OpenAI-compatible server (a
/// LocalVllm server or vLLM) through Microsoft.Extensions.AI.OpenAI. vLLM's extra sampling fields
/// (<c>AdditionalProperties</c> <c>top_k</c>, <c>min_p</c>, <c>repetition_penalty</c>, <c>min_tokens</c>, <c>ignore_eos</c>,
/// <c>enable_thinking</c> as <c>chat_template_kwargs</c>, <c>logit_bias</c>, <c>structured_outputs</c> in vLLM's form) and
/// <see cref="ChatOptions.TopK"/> travel in the request body;
/// unknown keys are refused as in-process.
/// </summary>
public sealed class RemoteChatClient : DelegatingChatClient
{
    private readonly ChatClientMetadata _metadata;

    /// <summary>A client for <paramref name="model"/> served at <paramref name="endpoint"/> (e.g. http://host:8000/v1).</summary>
    public RemoteChatClient(Uri endpoint, string model, string? apiKey = null)
        : base(new OpenAIClient(new ApiKeyCredential(apiKey ?? "none"), new OpenAIClientOptions { Endpoint = endpoint }).GetChatClient(model).AsIChatClient())
    {
        _metadata = new ChatClientMetadata("localvllm", endpoint, model);
    }

    public override Task<ChatResponse> GetResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default) =>
        base.GetResponseAsync(messages, WithExtras(options), cancellationToken);

    public override IAsyncEnumerable<ChatResponseUpdate> GetStreamingResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null,
        CancellationToken cancellationToken = default) =>
        base.GetStreamingResponseAsync(messages, WithExtras(options), cancellationToken);

    public override object? GetService(Type serviceType, object? serviceKey = null) =>
        serviceKey is null && serviceType == typeof(ChatClientMetadata) ? _metadata : base.GetService(serviceType, serviceKey);

    /// <summary>The options with vLLM's extra fields moved into the request body (a JSON patch on OpenAI's options).</summary>
    private static ChatOptions? WithExtras(ChatOptions? options)
    {
        if (options is null) return null;
        var extras = new List<(string Path, object Value)>();
        if (options.AdditionalProperties is { Count: > 0 } props)
            foreach (var (key, value) in props)
            {
                if (!ChatRequestMapper.AdditionalPropertyNames.Contains(key, StringComparer.Ordinal))
                    throw new NotSupportedException($"ChatOptions.AdditionalProperties[\"{key}\"] is not supported; the keys LocalVllm reads are {string.Join(", ", ChatRequestMapper.AdditionalPropertyNames)}.");
                if (key == "structured_outputs")
                {
                    // vLLM's structured_outputs object, which the server (ours or vLLM) reads as the in-process client does.
                    if (StructuredOutputsJson.FromAdditionalProperty(value) is { } constraint)
                        extras.Add(("$.structured_outputs", StructuredOutputsJson.ToJson(constraint)));
                    continue;
                }
                if (key == "bad_words")
                {
                    if (ChatRequestMapper.Words(options, key) is { } words)
                        extras.Add(("$.bad_words", new System.Text.Json.Nodes.JsonArray(words.Select(w => (System.Text.Json.Nodes.JsonNode?)w).ToArray())));
                    continue;
                }
                if (key is "stop_token_ids" or "allowed_token_ids")
                {
                    if (ChatRequestMapper.TokenIds(options, key) is { } ids)
                        extras.Add(("$." + key, new System.Text.Json.Nodes.JsonArray(ids.Select(id => (System.Text.Json.Nodes.JsonNode?)id).ToArray())));
                    continue;
                }
                if (key == "logit_bias")
                {
                    // OpenAI's logit_bias, one member per token id.
                    foreach (var (id, bias) in ChatRequestMapper.LogitBias(options) ?? new Dictionary<int, float>())
                        extras.Add(($"$.logit_bias['{id.ToString(System.Globalization.CultureInfo.InvariantCulture)}']", bias));
                    continue;
                }
                object? v = key switch
                {
                    "enable_thinking" or "ignore_eos" or "continue_final_message" or "add_generation_prompt" or "include_stop_str_in_output" => ChatRequestMapper.Extra<bool>(options, key),
                    "min_tokens" or "top_k" or "logprobs" or "priority" or "truncate_prompt_tokens" or "prompt_logprobs" => ChatRequestMapper.Extra<int>(options, key),
                    _ => ChatRequestMapper.Extra<float>(options, key),
                };
                if (v is null) continue;
                if (key == "enable_thinking") extras.Add(("$.chat_template_kwargs.enable_thinking", v));
                else if (key == "logprobs") { extras.Add(("$.logprobs", true)); extras.Add(("$.top_logprobs", v)); }
                else extras.Add(("$." + key, v));
            }
        if (options.TopK is int topK) extras.Add(("$.top_k", topK));
        if (options.Reasoning?.Effort is { } effort) extras.Add(("$.chat_template_kwargs.enable_thinking", effort != ReasoningEffort.None));
        if (extras.Count == 0) return options;

        var copy = options.Clone();
        copy.AdditionalProperties = null;
        copy.Reasoning = null;
        var previous = options.RawRepresentationFactory;
        copy.RawRepresentationFactory = client =>
        {
            var raw = previous?.Invoke(client) as ChatCompletionOptions ?? new ChatCompletionOptions();
#pragma warning disable SCME0001 // JsonPatch is how the SDK adds fields it has no property for
            foreach (var (path, value) in extras)
            {
                var utf8 = System.Text.Encoding.UTF8.GetBytes(path);
                switch (value)
                {
                    case bool b: raw.Patch.Set(utf8, b); break;
                    case int i: raw.Patch.Set(utf8, i); break;
                    case System.Text.Json.Nodes.JsonNode json: raw.Patch.Set(utf8, BinaryData.FromString(json.ToJsonString())); break;
                    default: raw.Patch.Set(utf8, (float)value); break; // the remaining keys are floats
                }
            }
#pragma warning restore SCME0001
            return raw;
        };
        return copy;
    }
}
