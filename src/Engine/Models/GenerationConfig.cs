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
    public float? MinP { get; init; }
    /// <summary>The default number of tokens to generate (<c>max_new_tokens</c>).</summary>
    public int? MaxNewTokens { get; init; }

    /// <summary>The fields <see cref="Override"/> takes, by their generation_config.json names.</summary>
    public static readonly string[] OverridableFields = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens"];

    /// <summary>These ids with the sampling settings of <paramref name="source"/>.</summary>
    public GenerationConfig WithSamplingOf(GenerationConfig source) => this with
    {
        DoSample = source.DoSample, Temperature = source.Temperature, TopK = source.TopK, TopP = source.TopP,
        RepetitionPenalty = source.RepetitionPenalty, MinP = source.MinP, MaxNewTokens = source.MaxNewTokens,
    };

    /// <summary>An <see cref="ArgumentException"/> naming an override key that is not one of <see cref="OverridableFields"/>.</summary>
    public static void CheckOverrides(IReadOnlyDictionary<string, double> overrides)
    {
        foreach (var (key, value) in overrides)
        {
            if (!OverridableFields.Contains(key))
                throw new ArgumentException($"OverrideGenerationConfig has '{key}', which is not one of {string.Join(", ", OverridableFields)}.", "OverrideGenerationConfig");
            if (key is "top_k" or "max_new_tokens" && (value != Math.Floor(value) || value < -1 || value > int.MaxValue))
                throw new ArgumentException($"OverrideGenerationConfig '{key}' is {value}; it must be a whole number.", "OverrideGenerationConfig");
        }
    }

    /// <summary>These settings with <paramref name="overrides"/> laid over them; a sampling field among them turns sampling on.</summary>
    public GenerationConfig Override(IReadOnlyDictionary<string, double> overrides)
    {
        CheckOverrides(overrides);
        var c = this;
        foreach (var (key, value) in overrides)
            c = key switch
            {
                "temperature" => c with { Temperature = (float)value, DoSample = true },
                "top_p" => c with { TopP = (float)value, DoSample = true },
                "top_k" => c with { TopK = (int)value, DoSample = true },
                "min_p" => c with { MinP = (float)value, DoSample = true },
                "repetition_penalty" => c with { RepetitionPenalty = (float)value },
                _ => c with { MaxNewTokens = (int)value },
            };
        return c;
    }

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
            MinP = (float?)f.Double("min_p", positive: false),
            MaxNewTokens = f.Int("max_new_tokens", min: 1, required: false),
        };
    }
}
