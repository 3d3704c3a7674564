using System.Text.Json.Nodes;
using LocalVllm.Engine.Loading;

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
        var json = JsonFiles.ReadObject(path);
        var f = new ModelConfig.ConfigFields(json, path);
        return new GenerationConfig
        {
            BosTokenId = ModelConfig.ReadIds(json["bos_token_id"], "bos_token_id", path) is [var b, ..] ? b : null,
            EosTokenIds = ModelConfig.ReadIds(json["eos_token_id"], "eos_token_id", path),
            PadTokenId = ModelConfig.ReadIds(json["pad_token_id"], "pad_token_id", path) is [var p, ..] ? p : null,
            DoSample = f.Bool("do_sample") ?? false,
            Temperature = (float?)f.Double("temperature", positive: false),
            TopK = f.Int("top_k", min: -1, required: false),
            TopP = (float?)f.Double("top_p", positive: true),
            RepetitionPenalty = (float?)f.Double("repetition_penalty", positive: true),
        };
    }
}
