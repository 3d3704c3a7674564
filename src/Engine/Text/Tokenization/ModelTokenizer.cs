using System.Text;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using LocalVllm.Engine.Loading;
using Microsoft.ML.Tokenizers;

namespace LocalVllm.Engine.Text.Tokenization;

/// <summary>
/// The model's own tokenizer, read from its directory: byte-level BPE (<c>tokenizer.json</c>, or <c>vocab.json</c> +
/// <c>merges.txt</c>) for Qwen2/Qwen3 and Llama 3, SentencePiece (<c>tokenizer.model</c>) for Llama 2, TinyLlama and
/// Mistral. Added tokens (<c>&lt;|im_start|&gt;</c>, <c>&lt;think&gt;</c>...) written in text encode as single ids.
/// </summary>
public sealed class ModelTokenizer
{
    private readonly Tokenizer _inner;
    private readonly byte[][] _tokenBytes;
    private readonly HashSet<int> _special;
    private readonly bool _sentencePiece;
    private SentencePieceBpe? _spm;
    private string[] _pieces = [];
    // tokenizer.json's post-processor for a single sequence (TemplateProcessing): the ids put before and after the text
    // when special tokens are added, as Hugging Face's tokenizer does (Llama 3's BOS, an embedding model's trailing EOS).
    private (int[] Before, int[] After)? _template;

    private ModelTokenizer(Tokenizer inner, byte[][] tokenBytes, HashSet<int> special, bool sentencePiece,
        IReadOnlyDictionary<string, int> addedTokens, int? bosId, bool addBos, bool addEos, int? eosId)
    {
        _inner = inner;
        _tokenBytes = tokenBytes;
        _special = special;
        _sentencePiece = sentencePiece;
        AddedTokens = addedTokens;
        BosTokenId = bosId;
        AddBosToken = addBos;
        AddEosToken = addEos;
        EosTokenId = eosId;
    }

    /// <summary>Tokens the tokenizer knows (the model's vocabulary may be larger).</summary>
    public int Count => _tokenBytes.Length;
    /// <summary>Added tokens by content (special or not).</summary>
    public IReadOnlyDictionary<string, int> AddedTokens { get; }
    public int? BosTokenId { get; }
    public int? EosTokenId { get; }
    /// <summary>tokenizer_config.json's <c>add_bos_token</c>.</summary>
    public bool AddBosToken { get; }
    /// <summary>tokenizer_config.json's <c>add_eos_token</c>.</summary>
    public bool AddEosToken { get; }
    /// <summary>Whether decoding strips SentencePiece's dummy-prefix space from the first piece.</summary>
    public bool IsSentencePiece => _sentencePiece;

    /// <summary>Whether <paramref name="id"/> is a special token (left out of text by default).</summary>
    public bool IsSpecial(int id) => _special.Contains(id);

    /// <summary>The raw bytes of token <paramref name="id"/> (SentencePiece's ▁ as a space; empty when unknown).</summary>
    public ReadOnlySpan<byte> TokenBytes(int id) => id >= 0 && id < _tokenBytes.Length ? _tokenBytes[id] : [];

    /// <summary>
    /// A token as the vocabulary spells it (Hugging Face's <c>convert_ids_to_tokens</c>): byte-level BPE's mapped
    /// characters (<c>Ġthe</c>), SentencePiece's pieces (<c>▁the</c>, <c>&lt;0x0A&gt;</c>), added tokens as written;
    /// empty for an id the tokenizer does not know.
    /// </summary>
    public string TokenPiece(int id) => id >= 0 && id < _pieces.Length ? _pieces[id] ?? "" : "";

    /// <summary>
    /// Encodes text; special tokens written in the text become their ids. With <paramref name="addSpecialTokens"/>, the
    /// tokens tokenizer.json's post-processor puts around a sequence (TemplateProcessing) are added, or, without one, BOS
    /// and EOS as tokenizer_config.json says.
    /// </summary>
    public int[] Encode(string text, bool addSpecialTokens = true)
    {
        ArgumentNullException.ThrowIfNull(text);
        CheckUnicode(text);
        var ids = new List<int>();
        if (addSpecialTokens && _template is var (before, _)) ids.AddRange(before);
        else if (addSpecialTokens && AddBosToken && BosTokenId is int bos) ids.Add(bos);
        if (_sentencePiece) EncodeSentencePiece(text, ids);
        else ids.AddRange(_inner.EncodeToIds(text));
        if (addSpecialTokens && _template is var (_, after)) ids.AddRange(after);
        else if (addSpecialTokens && AddEosToken && EosTokenId is int eos) ids.Add(eos);
        return [.. ids];
    }

    /// <summary>
    /// tokenizer.json's post-processor for one sequence, when it is a TemplateProcessing (alone or in a Sequence of
    /// processors): the special tokens' ids before and after <c>$A</c>. Null for others (ByteLevel only, none).
    /// </summary>
    private static (int[] Before, int[] After)? TemplateOf(JsonNode? processor)
    {
        if (processor?["type"]?.GetValue<string>() == "Sequence")
            return (processor["processors"] as JsonArray ?? []).Select(TemplateOf).FirstOrDefault(t => t is not null);
        if (processor?["type"]?.GetValue<string>() != "TemplateProcessing" || processor["single"] is not JsonArray single) return null;
        var special = processor["special_tokens"] as JsonObject;
        var before = new List<int>();
        var after = new List<int>();
        bool seen = false;
        foreach (var piece in single)
        {
            if (piece?["Sequence"] is not null) { seen = true; continue; }
            string id = piece?["SpecialToken"]?["id"]?.GetValue<string>() ?? throw new InvalidDataException("post_processor.single holds an item that is neither SpecialToken nor Sequence.");
            var ids = special?[id]?["ids"] as JsonArray ?? throw new InvalidDataException($"post_processor.special_tokens has no ids for '{id}'.");
            (seen ? after : before).AddRange(ids.Select(x => x!.GetValue<int>()));
        }
        return ([.. before], [.. after]);
    }

    /// <summary>A lone UTF-16 surrogate cannot be encoded as UTF-8: refused with its position instead of failing deep inside.</summary>
    private static void CheckUnicode(string text)
    {
        for (int i = 0; i < text.Length; i++)
        {
            char c = text[i];
            if (!char.IsSurrogate(c)) continue;
            if (char.IsHighSurrogate(c) && i + 1 < text.Length && char.IsLowSurrogate(text[i + 1])) { i++; continue; }
            throw new ArgumentException($"The text has a lone UTF-16 surrogate U+{(int)c:X4} at index {i}; text must be valid Unicode.", nameof(text));
        }
    }

    /// <summary>Decodes ids to text, skipping special tokens unless asked otherwise; invalid UTF-8 becomes U+FFFD.</summary>
    public string Decode(IEnumerable<int> ids, bool skipSpecialTokens = true)
    {
        var bytes = new List<byte>();
        bool first = true;
        foreach (var id in ids)
        {
            if (skipSpecialTokens && IsSpecial(id)) continue;
            var b = TokenBytes(id);
            if (first && _sentencePiece && !IsSpecial(id) && b.Length > 0 && b[0] == (byte)' ') b = b[1..];
            first = false;
            foreach (var x in b) bytes.Add(x);
        }
        return Encoding.UTF8.GetString(bytes.ToArray());
    }

    private void EncodeSentencePiece(string text, List<int> ids)
    {
        // Added tokens written in the text are split out first, as Hugging Face does; the pieces between go through
        // SentencePiece (with its dummy prefix only at the start of the text, as in the legacy Llama tokenizer).
        int start = 0;
        bool atStart = true;
        foreach (var (pos, len, id) in FindAddedTokens(text))
        {
            if (pos > start) ids.AddRange(EncodePiece(text[start..pos], atStart));
            ids.Add(id);
            atStart = false;
            start = pos + len;
        }
        if (start < text.Length) ids.AddRange(EncodePiece(text[start..], atStart));
    }

    /// <summary>Legacy Llama behaviour (legacy: true): every chunk between added tokens gets the dummy-prefix space.</summary>
    private IEnumerable<int> EncodePiece(string piece, bool atStart)
    {
        var ids = new List<int>();
        _spm!.Encode(piece, ids);
        return ids;
    }

    private IEnumerable<(int Pos, int Len, int Id)> FindAddedTokens(string text)
    {
        if (AddedTokens.Count == 0) yield break;
        int i = 0;
        while (i < text.Length)
        {
            (int, int, int)? best = null;
            foreach (var (content, id) in AddedTokens)
                if (string.CompareOrdinal(text, i, content, 0, content.Length) == 0 && (best is null || content.Length > best.Value.Item2))
                    best = (i, content.Length, id);
            if (best is { } b) { yield return b; i += b.Item2; }
            else i++;
        }
    }

    /// <summary>Loads the tokenizer in <paramref name="dir"/>, preferring byte-level BPE files over SentencePiece.</summary>
    public static ModelTokenizer Load(ModelDirectory dir) => Load(dir.Path, dir);

    /// <summary>Loads the tokenizer files in <paramref name="folder"/>; <paramref name="model"/> supplies BOS/EOS fallbacks.</summary>
    public static ModelTokenizer Load(string folder, ModelDirectory? model = null)
    {
        string? Existing(string name) => File.Exists(Path.Combine(folder, name)) ? Path.Combine(folder, name) : null;
        var dir = new TokenizerFiles(folder, Existing("tokenizer.json"), Existing("vocab.json"), Existing("merges.txt"),
            Existing("tokenizer.model"), model);
        string reading = Existing("tokenizer_config.json") ?? folder;
        try
        {
            var config = Existing("tokenizer_config.json") is string cfg ? JsonFiles.ReadObject(cfg) : null;
            (int[], int[])? template = null;
            if (dir.TokenizerJson is string tj)
            {
                reading = tj;
                var json = JsonFiles.ReadObject(tj);
                template = TemplateOf(json["post_processor"]);
                if (json["model"]?["type"]?.GetValue<string>() == "BPE" && json["decoder"]?["type"]?.GetValue<string>() is "ByteLevel")
                {
                    var bpe = LoadByteLevelBpe(json, config, dir, tj);
                    bpe._template = template;
                    return bpe;
                }
            }
            if (dir.VocabJson is string vj && dir.MergesTxt is string mt)
            {
                reading = vj;
                var vocab = JsonFiles.ReadObject(vj);
                var merges = File.ReadLines(mt).Where(l => l.Length > 0 && !l.StartsWith("#version", StringComparison.Ordinal));
                var json = new JsonObject { ["model"] = new JsonObject { ["vocab"] = vocab.DeepClone(), ["merges"] = new JsonArray(merges.Select(m => (JsonNode)m).ToArray()) } };
                return LoadByteLevelBpe(json, config, dir, vj);
            }
            if (dir.TokenizerModel is string tm)
            {
                reading = tm;
                var sp = LoadSentencePiece(tm, config, dir);
                sp._template = template;
                return sp;
            }
        }
        catch (Exception e) when (e is InvalidOperationException or NullReferenceException or FormatException or KeyNotFoundException
            or ArgumentException or IndexOutOfRangeException or OverflowException && e is not InvalidDataException)
        {
            // A field of the wrong type or shape deep in a tokenizer file: say which file, not just what failed.
            throw new InvalidDataException($"'{reading}' is not a tokenizer file this engine can read: {e.Message}", e);
        }
        throw new FileNotFoundException(
            $"No tokenizer in '{folder}': expected tokenizer.json (byte-level BPE), vocab.json + merges.txt, or tokenizer.model (SentencePiece).");
    }

    // The Qwen2/Llama 3 split regex, used when tokenizer.json does not give one.
    private const string DefaultSplit =
        @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    private static ModelTokenizer LoadByteLevelBpe(JsonObject json, JsonObject? config, TokenizerFiles dir, string source)
    {
        var model = json["model"]!.AsObject();
        var vocab = model["vocab"]!.AsObject().Select(kv => new KeyValuePair<string, int>(kv.Key, kv.Value!.GetValue<int>())).ToList();
        var merges = model["merges"]!.AsArray().Select(m => m is JsonArray pair ? $"{pair[0]!.GetValue<string>()} {pair[1]!.GetValue<string>()}" : m!.GetValue<string>()).ToList();

        var added = new Dictionary<string, int>(StringComparer.Ordinal);
        var special = new HashSet<int>();
        foreach (var t in json["added_tokens"]?.AsArray() ?? [])
        {
            added[t!["content"]!.GetValue<string>()] = t["id"]!.GetValue<int>();
            if (t["special"]?.GetValue<bool>() == true) special.Add(t["id"]!.GetValue<int>());
        }
        foreach (var (content, id, isSpecial) in AddedTokensFromConfig(config))
        {
            added.TryAdd(content, id);
            if (isSpecial) special.Add(id);
        }

        string pattern = FindSplitRegex(json["pre_tokenizer"]) ?? DefaultSplit;
        var options = new BpeOptions(vocab)
        {
            Merges = merges,
            ByteLevel = true,
            PreTokenizer = new RegexPreTokenizer(new Regex(pattern, RegexOptions.Compiled), added),
            SpecialTokens = added,
            Normalizer = json["normalizer"]?["type"]?.GetValue<string>() == "NFC" ? new NfcNormalizer() : null,
        };
        var inner = BpeTokenizer.Create(options);

        int size = Math.Max(vocab.Max(kv => kv.Value), added.Count == 0 ? 0 : added.Values.Max()) + 1;
        var bytes = new byte[size][];
        foreach (var (token, id) in vocab) bytes[id] = ByteLevel.ToBytes(token);
        foreach (var (token, id) in added) bytes[id] = Encoding.UTF8.GetBytes(token);
        for (int i = 0; i < size; i++) bytes[i] ??= [];
        var pieces = new string[size];
        foreach (var (token, id) in vocab) pieces[id] = token;
        foreach (var (token, id) in added) pieces[id] = token;

        var (bos, addBos, eos, addEos) = SpecialIds(config, added, dir, defaultAddBos: false);
        return new ModelTokenizer(inner, bytes, special, false, added, bos, addBos, addEos, eos) { _pieces = pieces };
    }

    private static ModelTokenizer LoadSentencePiece(string path, JsonObject? config, TokenizerFiles dir)
    {
        var added = new Dictionary<string, int>(StringComparer.Ordinal);
        var special = new HashSet<int>();
        SentencePieceTokenizer inner;
        using (var stream = File.OpenRead(path))
            inner = LlamaTokenizer.Create(stream, addBeginOfSentence: false, addEndOfSentence: false);
        foreach (var (content, id, isSpecial) in AddedTokensFromConfig(config))
        {
            added[content] = id;
            if (isSpecial) special.Add(id);
        }
        foreach (var s in new[] { inner.BeginningOfSentenceToken, inner.EndOfSentenceToken, inner.UnknownToken })
            if (s is not null && inner.Vocabulary.TryGetValue(s, out var id)) { added.TryAdd(s, id); special.Add(id); }

        int size = inner.Vocabulary.Values.Max() + 1;
        var bytes = new byte[size][];
        foreach (var (piece, id) in inner.Vocabulary)
        {
            if (piece.Length == 6 && piece.StartsWith("<0x", StringComparison.Ordinal) && piece.EndsWith('>'))
                bytes[id] = [Convert.ToByte(piece.Substring(3, 2), 16)];
            else if (special.Contains(id))
                bytes[id] = Encoding.UTF8.GetBytes(piece);
            else
                bytes[id] = Encoding.UTF8.GetBytes(piece.Replace('\u2581', ' '));
        }
        for (int i = 0; i < size; i++) bytes[i] ??= [];
        var (bos, addBos, eos, addEos) = SpecialIds(config, added, dir, defaultAddBos: true);
        bos ??= inner.BeginningOfSentenceId;
        eos ??= inner.EndOfSentenceId;
        var pieces = new string[size];
        foreach (var (piece, id) in inner.Vocabulary) pieces[id] = piece;
        foreach (var (content, id) in added) if (id < size) pieces[id] = content;
        return new ModelTokenizer(inner, bytes, special, true, added, bos, addBos, addEos, eos)
        {
            _spm = new SentencePieceBpe(File.ReadAllBytes(path), inner.AddDummyPrefix),
            _pieces = pieces,
        };
    }

    private static IEnumerable<(string Content, int Id, bool Special)> AddedTokensFromConfig(JsonObject? config)
    {
        if (config?["added_tokens_decoder"] is not JsonObject decoder) yield break;
        foreach (var (id, t) in decoder)
            yield return (t!["content"]!.GetValue<string>(), int.Parse(id, System.Globalization.CultureInfo.InvariantCulture), t["special"]?.GetValue<bool>() ?? false);
    }

    private static (int? Bos, bool AddBos, int? Eos, bool AddEos) SpecialIds(JsonObject? config, Dictionary<string, int> added, TokenizerFiles dir, bool defaultAddBos)
    {
        static string? TokenText(JsonNode? n) => n switch
        {
            JsonValue v when v.GetValueKind() == System.Text.Json.JsonValueKind.String => v.GetValue<string>(),
            JsonObject o => o["content"]?.GetValue<string>(),
            _ => null,
        };
        int? Lookup(string? s) => s is not null && added.TryGetValue(s, out var id) ? id : null;
        int? bos = Lookup(TokenText(config?["bos_token"])) ?? dir.Model?.Generation.BosTokenId ?? dir.Model?.Config.BosTokenId;
        int? eos = Lookup(TokenText(config?["eos_token"])) ?? (dir.Model is { EosTokenIds.Count: > 0 } m ? m.EosTokenIds[0] : null);
        bool addBos = config?["add_bos_token"]?.GetValue<bool>() ?? defaultAddBos;
        bool addEos = config?["add_eos_token"]?.GetValue<bool>() ?? false;
        if (config?["bos_token"] is null && config is not null && !defaultAddBos) addBos = false;
        return (bos, addBos, eos, addEos);
    }

    private static string? FindSplitRegex(JsonNode? pre) => pre switch
    {
        JsonObject o when o["type"]?.GetValue<string>() == "Split" => o["pattern"]?["Regex"]?.GetValue<string>(),
        JsonObject o when o["type"]?.GetValue<string>() == "Sequence" =>
            o["pretokenizers"]!.AsArray().Select(FindSplitRegex).FirstOrDefault(r => r is not null),
        _ => null,
    };

    private sealed record TokenizerFiles(string Path, string? TokenizerJson, string? VocabJson, string? MergesTxt, string? TokenizerModel, ModelDirectory? Model);

    private sealed class NfcNormalizer : Normalizer
    {
        public override string Normalize(string original) => original.Normalize(NormalizationForm.FormC);
        public override string Normalize(ReadOnlySpan<char> original) => original.ToString().Normalize(NormalizationForm.FormC);
    }
}
