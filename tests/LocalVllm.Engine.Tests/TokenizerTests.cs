using System.Diagnostics;
using System.Text.Json.Nodes;
using LocalVllm.Engine.Loading;
using LocalVllm.Engine.Text.Tokenization;

namespace LocalVllm.Engine.Tests;

/// <summary>Tokenizers against llama.cpp's / Hugging Face's test vectors and the fixtures' prompt ids.</summary>
public sealed class TokenizerTests
{
    private static ModelTokenizer Load(string fixtureRelative) => ModelTokenizer.Load(ModelDirectoryFor(fixtureRelative));

    /// <summary>Tokenizer folders have no config.json; borrow a model directory view over the tokenizer files.</summary>
    private static ModelDirectory ModelDirectoryFor(string relative) => relative switch
    {
        "qwen3" => ModelDirectory.Open(Fixtures.Model("tiny-qwen3-chat")),
        "stories" => ModelDirectory.Open(Fixtures.Model("stories260K")),
        _ => throw new ArgumentException(relative),
    };

    private static JsonArray Vectors(string name) => JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.Root, "tokenizers", "vectors", name)))!.AsArray();

    [Fact]
    public void Qwen3_byte_level_bpe_encodes_every_vector_exactly_and_round_trips()
    {
        var tok = Load("qwen3");
        var failures = new List<string>();
        foreach (var v in Vectors("qwen2.json"))
        {
            var text = v!["text"]!.GetValue<string>();
            var expected = Fixtures.Ints(v["ids"]);
            var ids = tok.Encode(text, addSpecialTokens: false);
            if (!ids.SequenceEqual(expected)) failures.Add($"{JsonValue.Create(text)}: [{string.Join(",", ids)}] vs [{string.Join(",", expected)}]");
            else if (tok.Decode(ids) != text.Normalize(System.Text.NormalizationForm.FormC)) failures.Add($"decode {JsonValue.Create(text)}");
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }

    [Fact]
    public void Qwen3_chat_prompts_encode_to_the_reference_ids_with_special_tokens_whole()
    {
        var tok = Load("qwen3");
        foreach (var c in Fixtures.Reference("tiny-qwen3-chat")["cases"]!.AsArray())
        {
            var ids = tok.Encode(c!["prompt_text"]!.GetValue<string>());
            Assert.Equal(Fixtures.Ints(c["prompt_ids"]), ids);
        }
        Assert.Equal(151644, tok.AddedTokens["<|im_start|>"]);
        Assert.True(tok.IsSpecial(151645));
        Assert.False(tok.IsSpecial(tok.AddedTokens["<think>"]));
    }

    /// <summary>
    /// Tokens as the vocabulary spells them (vLLM's /tokenize return_token_strs): for every vector's ids, the piece
    /// tokenizer.json's own vocabulary maps to that id (read here independently), for byte-level BPE (Qwen) and
    /// SentencePiece (Llama 2: ▁ pieces and byte fallback), and added tokens as written.
    /// </summary>
    [Theory]
    [InlineData("qwen3", "qwen2.json")]
    [InlineData("llama2", "llama-spm.json")]
    public void Token_pieces_are_the_vocabularys_spelling(string folder, string vectors)
    {
        var dir = Path.Combine(Fixtures.Root, "tokenizers", folder);
        var tok = ModelTokenizer.Load(dir);
        var json = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "tokenizer.json")))!;
        var byId = json["model"]!["vocab"]!.AsObject().ToDictionary(kv => kv.Value!.GetValue<int>(), kv => kv.Key);
        foreach (var t in json["added_tokens"]?.AsArray() ?? []) byId[t!["id"]!.GetValue<int>()] = t["content"]!.GetValue<string>();
        int checkedIds = 0;
        foreach (var v in Vectors(vectors))
            foreach (int id in tok.Encode(v!["text"]!.GetValue<string>(), addSpecialTokens: false))
            {
                Assert.Equal(byId[id], tok.TokenPiece(id));
                checkedIds++;
            }
        Assert.True(checkedIds > 100);
        if (folder == "llama2")
            Assert.Equal(["▁Hello", "▁world", "<0x0A>"], tok.Encode("Hello world\n", addSpecialTokens: false).Select(tok.TokenPiece));
        else
            Assert.Equal(["Hello", "Ġworld", "<|im_end|>"], tok.Encode("Hello world<|im_end|>", addSpecialTokens: false).Select(tok.TokenPiece));
        Assert.Equal("", tok.TokenPiece(-1));
    }

    /// <summary>
    /// tokenizer.json's post-processor puts special tokens around a sequence when they are added, as Hugging Face's
    /// tokenizer does: Llama 2's "&lt;s&gt; $A", and an embedding model's trailing &lt;|endoftext|&gt; (Qwen3-Embedding's
    /// tokenizer gives [1944, 151643] for "test" and [1944, 1549, 151643] for "test again"; here the Qwen3 tokenizer with
    /// that post-processor, inside a Sequence after ByteLevel as it is written there). Without them, the text alone.
    /// </summary>
    [Fact]
    public void The_post_processors_template_adds_its_special_tokens()
    {
        var llama = ModelTokenizer.Load(Path.Combine(Fixtures.Root, "tokenizers", "llama2"));
        var text = "Hello world";
        Assert.Equal([1, .. llama.Encode(text, addSpecialTokens: false)], llama.Encode(text));

        var dir = Directory.CreateTempSubdirectory("localvllm-embed-tok-").FullName;
        try
        {
            var source = Path.Combine(Fixtures.Root, "tokenizers", "qwen3");
            foreach (var f in Directory.GetFiles(source)) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
            var json = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "tokenizer.json")))!;
            json["post_processor"] = JsonNode.Parse("""
                {"type": "Sequence", "processors": [
                  {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
                  {"type": "TemplateProcessing",
                   "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
                   "pair": [],
                   "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [151643], "tokens": ["<|endoftext|>"]}}}]}
                """);
            File.WriteAllText(Path.Combine(dir, "tokenizer.json"), json.ToJsonString());
            var tok = ModelTokenizer.Load(dir);
            Assert.Equal([1944, 151643], tok.Encode("test"));
            Assert.Equal([1944, 1549, 151643], tok.Encode("test again"));
            Assert.Equal([1944], tok.Encode("test", addSpecialTokens: false));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
        // Qwen3's own tokenizer.json has only ByteLevel there: nothing is added.
        Assert.Equal([1944], Load("qwen3").Encode("test"));
    }

    [Fact]
    public void Llama2_sentencepiece_encodes_the_vectors()
    {
        var tok = ModelTokenizer.Load(Path.Combine(Fixtures.Root, "tokenizers", "llama2"));
        var failures = new List<string>();
        foreach (var v in Vectors("llama-spm.json"))
        {
            var text = v!["text"]!.GetValue<string>();
            var expected = Fixtures.Ints(v["ids"]);
            var ids = tok.Encode(text, addSpecialTokens: false);
            if (!ids.SequenceEqual(expected)) failures.Add($"{JsonValue.Create(text)}: [{string.Join(",", ids)}] vs [{string.Join(",", expected)}]");
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }

    [Fact]
    public void Stories_sentencepiece_encodes_the_reference_samples()
    {
        var tok = Load("stories");
        foreach (var c in Fixtures.Reference("stories260K")["tokenizer_samples"]!["cases"]!.AsArray())
            Assert.Equal(Fixtures.Ints(c!["ids"]), tok.Encode(c["text"]!.GetValue<string>()));
        foreach (var c in Fixtures.Reference("stories260K")["cases"]!.AsArray())
        {
            var ids = Fixtures.Ints(c!["prompt_ids"]);
            Assert.Equal(ids, tok.Encode(c["text"]!.GetValue<string>()));
            var full = ids.Concat(Fixtures.Ints(c["greedy_ids"]));
            Assert.Equal(c["full_text"]!.GetValue<string>(), tok.Decode(full));
        }
    }
}
