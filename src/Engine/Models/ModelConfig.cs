using System.Text.Json;
using System.Text.Json.Nodes;

namespace LocalVllm.Engine.Models;

/// <summary>RoPE scaling from config.json's <c>rope_scaling</c>; <c>Type</c> is "default" when absent.</summary>
public sealed record RopeScaling(
    string Type,
    double Factor = 1.0,
    double LowFreqFactor = 1.0,
    double HighFreqFactor = 4.0,
    int OriginalMaxPositionEmbeddings = 0);

/// <summary>The fields of a Hugging Face <c>config.json</c> that the decoder needs.</summary>
public sealed record ModelConfig
{
    /// <summary>The supported <c>architectures[0]</c> values.</summary>
    public static readonly IReadOnlyList<string> SupportedArchitectures =
        ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"];

    /// <summary>The supported <c>rope_scaling</c> types.</summary>
    public static readonly IReadOnlyList<string> SupportedRopeTypes = ["default", "llama3", "linear", "dynamic"];

    public required string Architecture { get; init; }
    public required int VocabSize { get; init; }
    public required int HiddenSize { get; init; }
    public required int IntermediateSize { get; init; }
    public required int NumHiddenLayers { get; init; }
    public required int NumAttentionHeads { get; init; }
    public required int NumKeyValueHeads { get; init; }
    public required int HeadDim { get; init; }
    public required double RmsNormEps { get; init; }
    public required double RopeTheta { get; init; }
    public required RopeScaling RopeScaling { get; init; }
    public required int MaxPositionEmbeddings { get; init; }
    public required bool TieWordEmbeddings { get; init; }
    /// <summary>q/k/v projections carry a bias (Qwen2, or <c>attention_bias</c>).</summary>
    public required bool AttentionBias { get; init; }
    /// <summary>Per-head RMSNorm on queries and keys before RoPE (Qwen3).</summary>
    public required bool QkNorm { get; init; }
    public required string TorchDtype { get; init; }
    public int? BosTokenId { get; init; }
    public IReadOnlyList<int> EosTokenIds { get; init; } = [];

    /// <summary>Reads and validates <paramref name="path"/> (a config.json).</summary>
    public static ModelConfig Load(string path)
    {
        if (!File.Exists(path))
            throw new FileNotFoundException($"Model config not found: '{path}'. A Hugging Face model directory needs a config.json.", path);
        JsonObject json;
        try
        {
            json = JsonNode.Parse(File.ReadAllText(path))?.AsObject()
                ?? throw new InvalidDataException($"'{path}' is empty.");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"'{path}' is not valid JSON: {e.Message}", e);
        }
        return Parse(json, path);
    }

    internal static ModelConfig Parse(JsonObject json, string source)
    {
        var architecture = json["architectures"] is JsonArray { Count: > 0 } archs && archs[0] is JsonValue a && a.TryGetValue<string>(out var arch) ? arch
            : throw new InvalidDataException($"'{source}' has no 'architectures' entry; supported: {string.Join(", ", SupportedArchitectures)}.");
        if (!SupportedArchitectures.Contains(architecture))
            throw new NotSupportedException(
                $"Unknown architecture '{architecture}' in '{source}'. Supported architectures: {string.Join(", ", SupportedArchitectures)}.");
        var f = new ConfigFields(json, source);

        int hidden = f.Int("hidden_size", min: 1)!.Value;
        int heads = f.Int("num_attention_heads", min: 1)!.Value;
        int kvHeads = f.Int("num_key_value_heads", min: 1, required: false) ?? heads;
        if (heads % kvHeads != 0)
            throw new InvalidDataException($"'{source}': num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kvHeads}).");
        int? explicitHeadDim = f.Int("head_dim", min: 1, required: false);
        if (explicitHeadDim is null && hidden % heads != 0)
            throw new InvalidDataException($"'{source}': hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}) when head_dim is not given.");
        bool isQwen2 = architecture == "Qwen2ForCausalLM";
        bool isQwen3 = architecture == "Qwen3ForCausalLM";

        return new ModelConfig
        {
            Architecture = architecture,
            VocabSize = f.Int("vocab_size", min: 1)!.Value,
            HiddenSize = hidden,
            IntermediateSize = f.Int("intermediate_size", min: 1)!.Value,
            NumHiddenLayers = f.Int("num_hidden_layers", min: 1)!.Value,
            NumAttentionHeads = heads,
            NumKeyValueHeads = kvHeads,
            HeadDim = explicitHeadDim ?? hidden / heads,
            RmsNormEps = f.Double("rms_norm_eps", positive: true) ?? 1e-6,
            RopeTheta = f.Double("rope_theta", positive: true) ?? 10000.0,
            RopeScaling = ParseRopeScaling(json["rope_scaling"], source),
            MaxPositionEmbeddings = f.Int("max_position_embeddings", min: 1, required: false) ?? 2048,
            TieWordEmbeddings = f.Bool("tie_word_embeddings") ?? false,
            AttentionBias = isQwen2 || (f.Bool("attention_bias") ?? false),
            QkNorm = isQwen3,
            TorchDtype = f.String("torch_dtype") ?? "float32",
            BosTokenId = ReadIds(json["bos_token_id"], "bos_token_id", source) is [var b, ..] ? b : null,
            EosTokenIds = ReadIds(json["eos_token_id"], "eos_token_id", source),
        };
    }

    /// <summary>Typed reads of config fields: a value of the wrong type or range is an error naming the file, the field and what is allowed.</summary>
    internal readonly struct ConfigFields(JsonObject json, string source)
    {
        private JsonValue? Value(string key, string expected)
        {
            var node = json[key];
            if (node is null || node.GetValueKind() == JsonValueKind.Null) return null;
            return node as JsonValue ?? throw Bad(key, expected, node);
        }

        private InvalidDataException Bad(string key, string expected, JsonNode? node) =>
            new($"'{source}': field '{key}' must be {expected}, got {node?.ToJsonString() ?? "null"}.");

        public int? Int(string key, int min, bool required = true)
        {
            string expected = $"an integer >= {min}";
            var v = Value(key, expected);
            if (v is null) return required ? throw new InvalidDataException($"'{source}' lacks the required field '{key}' ({expected}).") : null;
            if (v.GetValueKind() != JsonValueKind.Number || !v.TryGetValue<int>(out var i) || i < min) throw Bad(key, expected, v);
            return i;
        }

        public double? Double(string key, bool positive)
        {
            var v = Value(key, positive ? "a number > 0" : "a number");
            if (v is null) return null;
            if (v.GetValueKind() != JsonValueKind.Number || !v.TryGetValue<double>(out var d) || (positive && !(d > 0))) throw Bad(key, positive ? "a number > 0" : "a number", v);
            return d;
        }

        public bool? Bool(string key)
        {
            var v = Value(key, "true or false");
            if (v is null) return null;
            return v.GetValueKind() switch { JsonValueKind.True => true, JsonValueKind.False => false, _ => throw Bad(key, "true or false", v) };
        }

        public string? String(string key)
        {
            var v = Value(key, "a string");
            if (v is null) return null;
            return v.TryGetValue<string>(out var s) ? s : throw Bad(key, "a string", v);
        }
    }

    /// <summary>A token id or a list of them (eos_token_id may be either); anything else is an error naming the field.</summary>
    internal static IReadOnlyList<int> ReadIds(JsonNode? node, string key, string source)
    {
        static bool IsId(JsonNode? n, out int id)
        {
            id = 0;
            return n is JsonValue v && v.GetValueKind() == JsonValueKind.Number && v.TryGetValue(out id) && id >= 0;
        }
        switch (node)
        {
            case null:
                return [];
            case JsonValue v when v.GetValueKind() == JsonValueKind.Null:
                return [];
            case JsonArray array:
                var ids = new List<int>();
                foreach (var n in array)
                    if (n is not null) ids.Add(IsId(n, out var id) ? id : throw new InvalidDataException($"'{source}': field '{key}' must be a token id or a list of token ids (integers >= 0), got {node.ToJsonString()}."));
                return ids;
            default:
                return IsId(node, out var one) ? [one]
                    : throw new InvalidDataException($"'{source}': field '{key}' must be a token id or a list of token ids (integers >= 0), got {node.ToJsonString()}.");
        }
    }

    private static RopeScaling ParseRopeScaling(JsonNode? node, string source)
    {
        if (node is not JsonObject o) return new RopeScaling("default");
        var type = (o["rope_type"] ?? o["type"])?.GetValue<string>() ?? "default";
        if (!SupportedRopeTypes.Contains(type))
            throw new NotSupportedException(
                $"Unknown rope_scaling type '{type}' in '{source}'. Supported: {string.Join(", ", SupportedRopeTypes)} (or null).");
        return new RopeScaling(
            type,
            o["factor"]?.GetValue<double>() ?? 1.0,
            o["low_freq_factor"]?.GetValue<double>() ?? 1.0,
            o["high_freq_factor"]?.GetValue<double>() ?? 4.0,
            o["original_max_position_embeddings"]?.GetValue<int>() ?? 0);
    }
}
