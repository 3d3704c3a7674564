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
        var architecture = json["architectures"]?.AsArray().FirstOrDefault()?.GetValue<string>()
            ?? throw new InvalidDataException($"'{source}' has no 'architectures' entry; supported: {string.Join(", ", SupportedArchitectures)}.");
        if (!SupportedArchitectures.Contains(architecture))
            throw new NotSupportedException(
                $"Unknown architecture '{architecture}' in '{source}'. Supported architectures: {string.Join(", ", SupportedArchitectures)}.");

        int Req(string key) => json[key]?.GetValue<int>()
            ?? throw new InvalidDataException($"'{source}' lacks the required field '{key}'.");

        int hidden = Req("hidden_size");
        int heads = Req("num_attention_heads");
        int headDim = json["head_dim"] is JsonNode hd && hd.GetValueKind() == JsonValueKind.Number ? hd.GetValue<int>() : hidden / heads;
        bool isQwen2 = architecture == "Qwen2ForCausalLM";
        bool isQwen3 = architecture == "Qwen3ForCausalLM";

        return new ModelConfig
        {
            Architecture = architecture,
            VocabSize = Req("vocab_size"),
            HiddenSize = hidden,
            IntermediateSize = Req("intermediate_size"),
            NumHiddenLayers = Req("num_hidden_layers"),
            NumAttentionHeads = heads,
            NumKeyValueHeads = json["num_key_value_heads"]?.GetValue<int>() ?? heads,
            HeadDim = headDim,
            RmsNormEps = json["rms_norm_eps"]?.GetValue<double>() ?? 1e-6,
            RopeTheta = json["rope_theta"]?.GetValue<double>() ?? 10000.0,
            RopeScaling = ParseRopeScaling(json["rope_scaling"], source),
            MaxPositionEmbeddings = json["max_position_embeddings"]?.GetValue<int>() ?? 2048,
            TieWordEmbeddings = json["tie_word_embeddings"]?.GetValue<bool>() ?? false,
            AttentionBias = isQwen2 || (json["attention_bias"]?.GetValue<bool>() ?? false),
            QkNorm = isQwen3,
            TorchDtype = json["torch_dtype"]?.GetValue<string>() ?? "float32",
            BosTokenId = ReadIds(json["bos_token_id"]) is [var b, ..] ? b : null,
            EosTokenIds = ReadIds(json["eos_token_id"]),
        };
    }

    internal static IReadOnlyList<int> ReadIds(JsonNode? node) => node switch
    {
        null => [],
        JsonArray array => array.Where(n => n is not null).Select(n => n!.GetValue<int>()).ToArray(),
        JsonValue v when v.GetValueKind() == JsonValueKind.Number => [v.GetValue<int>()],
        _ => [],
    };

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
