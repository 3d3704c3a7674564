using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using LocalVllm.Engine;
using LocalVllm.Engine.Structured;
using LocalVllm.Engine.Text.Tokenization;

namespace LocalVllm.Bench;

/// <summary>
/// MaskBench (JSONSchemaBench's token-mask benchmark) over shared/fixtures/maskbench, exactly as its README gives the
/// protocol: per file, compile the schema (an error is a compile error); per test, serialise the instance as Python's
/// json.dumps does, tokenise it with the Qwen3 tokenizer (no special tokens), and for each token compute the mask and
/// check the token is in it, advancing if so. A valid instance with a refused token is a validation error; an invalid
/// one with every token allowed is an invalidation error. Times: compile plus first mask (TTFM) per file, and each
/// mask (TBM), as percentiles. One thread. Also checked on every token: the mask agrees with advancing by the token's
/// bytes.
/// </summary>
internal static class MaskBench
{
    public sealed record Settings(string? Filter, int Limit, string? Json, bool Verbose, bool CompileOnly = false);

    public static int Run(Settings s)
    {
        var tokDir = BenchModels.FindShared("fixtures/tokenizers/qwen3");
        var casesDir = BenchModels.FindShared("fixtures/maskbench/cases");
        var tokenizer = ModelTokenizer.Load(tokDir);
        var sw = Stopwatch.StartNew();
        var vocab = new TokenVocabulary(tokenizer, 151_936);
        Console.WriteLine($"Qwen3 vocabulary: {tokenizer.Count:N0} tokens, trie of {vocab.TrieNodes:N0} nodes built in {sw.Elapsed.TotalMilliseconds:F0} ms");

        var files = Directory.GetFiles(casesDir, "*.json").Order(StringComparer.Ordinal)
            .Where(f => s.Filter is null || Path.GetFileName(f).Contains(s.Filter, StringComparison.Ordinal)).Take(s.Limit).ToArray();
        int passing = 0, compileErrors = 0, validationErrors = 0, invalidationErrors = 0, caughtAtEnd = 0, disagreements = 0, tests = 0, tokens = 0;
        var ttfm = new List<double>();
        var tbm = new List<double>();
        var compileReasons = new Dictionary<string, int>();
        var mask = new ulong[vocab.Words];
        foreach (var file in files)
        {
            if (s.Verbose) Console.WriteLine($"{Path.GetFileName(file)}");
            var doc = JsonNode.Parse(File.ReadAllText(file))!;
            var schema = doc["schema"]!.ToJsonString();
            GrammarMatcher start;
            long t0 = Stopwatch.GetTimestamp();
            try
            {
                var grammar = ConstraintCompiler.Compile(StructuredOutputs.ForJsonSchema(schema, JsonWhitespace.Flexible) with { StrictJson = false });
                start = new GrammarMatcher(grammar, vocab);
                start.FillMask(mask);
                ttfm.Add(Stopwatch.GetElapsedTime(t0).TotalMicroseconds);
                if (s.Verbose && ttfm[^1] > 100_000) Console.WriteLine($"  slow compile {Path.GetFileName(file)}: {ttfm[^1] / 1000:F0} ms, {grammar.StateCount} states");
            }
            catch (ArgumentException e)
            {
                compileErrors++;
                if (s.Verbose && Stopwatch.GetElapsedTime(t0).TotalMilliseconds > 100) Console.WriteLine($"  slow compile error {Path.GetFileName(file)}: {Stopwatch.GetElapsedTime(t0).TotalMilliseconds:F0} ms");
                var reason = Reason(e.Message);
                compileReasons[reason] = compileReasons.GetValueOrDefault(reason) + 1;
                if (s.Verbose) Console.WriteLine($"  compile error {Path.GetFileName(file)}: {e.Message}");
                continue;
            }
            if (s.CompileOnly) continue;
            bool filePasses = true;
            foreach (var test in (doc["tests"] as JsonArray) ?? [])
            {
                tests++;
                bool valid = test!["valid"]!.GetValue<bool>();
                var text = PythonJson.Dumps(test["data"]);
                var ids = tokenizer.Encode(text, addSpecialTokens: false);
                var m = start.Clone();
                bool allAllowed = true;
                foreach (int id in ids)
                {
                    long t1 = Stopwatch.GetTimestamp();
                    m.FillMask(mask);
                    tbm.Add(Stopwatch.GetElapsedTime(t1).TotalMicroseconds);
                    tokens++;
                    bool inMask = (mask[id >> 6] & (1UL << id)) != 0;
                    bool advanced = m.Clone().TryAdvance(id);
                    if (inMask != advanced) disagreements++;
                    if (!inMask) { allAllowed = false; break; }
                    m.TryAdvance(id);
                }
                if (valid && !allAllowed)
                {
                    validationErrors++;
                    filePasses = false;
                    if (s.Verbose) Console.WriteLine($"  validation error {Path.GetFileName(file)}: {Truncate(RefusedAt(start, text))}");
                }
                else if (!valid && allAllowed)
                {
                    invalidationErrors++;
                    filePasses = false;
                    if (!m.IsAccepting) caughtAtEnd++;
                    if (s.Verbose) Console.WriteLine($"  invalidation error {Path.GetFileName(file)} (complete: {m.IsAccepting}): {Truncate(text)}");
                }
            }
            if (filePasses) passing++;
        }
        ttfm.Sort();
        tbm.Sort();
        double P(List<double> v, double q) => v.Count == 0 ? 0 : v[Math.Min(v.Count - 1, (int)(q * v.Count))];
        Console.WriteLine();
        Console.WriteLine($"files {files.Length}, tests {tests}, tokens {tokens}");
        Console.WriteLine($"passing {passing} ({100.0 * passing / files.Length:F1}%), compile errors {compileErrors}, validation errors {validationErrors}, invalidation errors {invalidationErrors} (of which {caughtAtEnd} end incomplete, so EOS is refused)");
        Console.WriteLine($"mask vs advance disagreements: {disagreements}");
        Console.WriteLine($"TBM us: p50 {P(tbm, .5):F1} p75 {P(tbm, .75):F1} p90 {P(tbm, .9):F1} p99 {P(tbm, .99):F1} p99.9 {P(tbm, .999):F1} max {(tbm.Count > 0 ? tbm[^1] : 0):F1}");
        Console.WriteLine($"TTFM us: p50 {P(ttfm, .5):F0} p75 {P(ttfm, .75):F0} p90 {P(ttfm, .9):F0} p99 {P(ttfm, .99):F0} p99.9 {P(ttfm, .999):F0} max {(ttfm.Count > 0 ? ttfm[^1] : 0):F0}");
        Console.WriteLine($"cached automaton states: {vocab.CachedStates:N0}; managed heap {GC.GetTotalMemory(false) >> 20} MiB");
        Console.WriteLine("compile errors by reason:");
        foreach (var (reason, count) in compileReasons.OrderByDescending(kv => kv.Value)) Console.WriteLine($"  {count,5}  {reason}");
        if (s.Json is not null)
            File.WriteAllText(s.Json, JsonSerializer.Serialize(new
            {
                files = files.Length, tests, tokens, passing, compileErrors, validationErrors, invalidationErrors, caughtAtEnd, disagreements,
                tbm = new { p50 = P(tbm, .5), p75 = P(tbm, .75), p90 = P(tbm, .9), p99 = P(tbm, .99), p999 = P(tbm, .999), max = tbm.Count > 0 ? tbm[^1] : 0 },
                ttfm = new { p50 = P(ttfm, .5), p75 = P(ttfm, .75), p90 = P(ttfm, .9), p99 = P(ttfm, .99), p999 = P(ttfm, .999), max = ttfm.Count > 0 ? ttfm[^1] : 0 },
                compileReasons,
            }, new JsonSerializerOptions { WriteIndented = true }));
        return 0;
    }

    private static string Reason(string message)
    {
        // "#/properties/x: the keyword 'not' is ..." -> "the keyword 'not' is ..."
        int colon = message.IndexOf(": ", StringComparison.Ordinal);
        var r = message.StartsWith('#') && colon > 0 ? message[(colon + 2)..] : message;
        if (r.StartsWith("the regular expression", StringComparison.Ordinal)) r = "regex: " + r[(r.IndexOf(" does not compile", StringComparison.Ordinal) + 1)..];
        return r.Length > 110 ? r[..110] : r;
    }

    /// <summary>The text with a mark where the constraint first refuses a byte (the start shows the context).</summary>
    private static string RefusedAt(GrammarMatcher start, string text)
    {
        var bytes = System.Text.Encoding.UTF8.GetBytes(text);
        var m = start.Clone();
        int k = 0;
        while (k < bytes.Length && m.TryAdvance(bytes.AsSpan(k, 1))) k++;
        var before = System.Text.Encoding.UTF8.GetString(bytes, 0, k);
        return (before.Length > 100 ? "..." + before[^100..] : before) + " >>>" + System.Text.Encoding.UTF8.GetString(bytes, k, Math.Min(40, bytes.Length - k));
    }

    private static string Truncate(string s) => s.Length > 160 ? s[..160] + "..." : s;
}
