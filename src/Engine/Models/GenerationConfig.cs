using System.Text.Json.Nodes;

namespace LocalVllm.Engine.Models;

/// <summary>The optional <c>generation_config.json</c>: special ids and the model's default sampling settings.</summary>
public sealed record GenerationConfig
{
    public int? BosTokenId { get; init; }
    public IReadOnlyList<int> EosTokenIds { get; init; } = [];
    public int? PadTokenId { get; init; }
    public bool DoSample { get; init; }
    public float? Temperature { get; init; }
    public int? TopK { get; init; }
    public float? TopP { get; init; }
    public float? RepetitionPenalty { get; init; }

    /// <summary>Reads <paramref name="path"/>, or returns an empty config when the file does not exist.</summary>
    public static GenerationConfig Load(string path)
    {
        if (!File.Exists(path)) return new GenerationConfig();
        var json = JsonNode.Parse(File.ReadAllText(path))?.AsObject()
            ?? throw new InvalidDataException($"'{path}' is empty.");
        return new GenerationConfig
        {
            BosTokenId = ModelConfig.ReadIds(json["bos_token_id"]) is [var b, ..] ? b : null,
            EosTokenIds = ModelConfig.ReadIds(json["eos_token_id"]),
            PadTokenId = ModelConfig.ReadIds(json["pad_token_id"]) is [var p, ..] ? p : null,
            DoSample = json["do_sample"]?.GetValue<bool>() ?? false,
            Temperature = (float?)json["temperature"]?.GetValue<double>(),
            TopK = json["top_k"]?.GetValue<int>(),
            TopP = (float?)json["top_p"]?.GetValue<double>(),
            RepetitionPenalty = (float?)json["repetition_penalty"]?.GetValue<double>(),
        };
    }
}
